"""Guard llama.cpp's use of VK_EXT_layer_settings so that it builds against older Vulkan headers.

Without it, Debian 12's headers (1.3.239) stop the Vulkan build at
``ggml-vulkan.cpp: error: 'LayerSettingEXT' is not a member of 'vk'``: the extension is newer
than those headers, and ``ggml_vk_instance_init()`` uses it unguarded. With the guard the instance
is created without the validation layer's settings, which only matter when debugging. Drop this
patch once the distribution's headers know the extension (the guard is then a no-op anyway).

Usage: python patch_ggml_vulkan.py path/to/ggml-vulkan.cpp   (idempotent)
"""

import sys
from pathlib import Path

GUARD = "#if defined(VK_EXT_layer_settings)  /* edge-lora: older Vulkan headers lack it */"
BEGIN = "    VkBool32 enable_best_practice = layer_settings;\n"
END = "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions, &layer_setting_info);\n"
FALLBACK = "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions);\n"


def patch(source: str) -> str:
    if GUARD in source:
        return source
    start, end = source.find(BEGIN), source.find(END)
    if start < 0 or end < start:
        raise SystemExit("patch_ggml_vulkan: the layer-settings block was not found; this llama.cpp may not need the "
                         "patch (try building without it) or the patch needs updating")
    end += len(END)
    return source[:start] + GUARD + "\n" + source[start:end] + "#else\n" + FALLBACK + "#endif\n" + source[end:]


if __name__ == "__main__":
    path = Path(sys.argv[1])
    path.write_text(patch(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"patch_ggml_vulkan: guarded VK_EXT_layer_settings in {path}")
