#!/usr/bin/env bash
# Sets up the GPU half of the runtime on a machine with no GPU, into the active Python environment:
#   - ONNX Runtime's WebGPU provider (pip onnxruntime-ep-webgpu) on SwiftShader's Vulkan driver
#     (taken out of Debian's chromium-common package: installing the package drags in systemd);
#   - llama-cpp-python built with llama.cpp's Vulkan backend, for Mesa's lavapipe, the wheel cached
#     so that a machine pays the ~10 minutes of the build once.
# On a machine with a real GPU and its driver, only the two Python packages matter; the tests set
# the software-device switches (VK_ICD_FILENAMES, ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER,
# GGML_VK_VISIBLE_DEVICES) themselves, the library never does (tests/gpu_env.py).
#
# Usage: . .venv/bin/activate && bash scripts/software-gpu.sh
# Cache: $EDGE_LORA_CACHE (default ~/.cache/edge-lora): software-gpu/ (SwiftShader) and wheels/.
set -euo pipefail

LLAMA_CPP_VERSION=0.3.36  # the version DESIGN.md's checks were made with; keep in step with pyproject.toml
WEBGPU_EP_VERSION=0.4.0
CACHE=${EDGE_LORA_CACHE:-$HOME/.cache/edge-lora}
SWIFTSHADER=$CACHE/software-gpu
WHEELS=$CACHE/wheels
here=$(cd "$(dirname "$0")" && pwd)

say() { printf 'software-gpu: %s\n' "$*"; }

if [ -z "${VIRTUAL_ENV:-}" ] && [ "${EDGE_LORA_ANY_PYTHON:-0}" != 1 ]; then
  say "activate the project's virtual environment first (or set EDGE_LORA_ANY_PYTHON=1)"; exit 2
fi

# --- system packages: the Vulkan loader, Mesa's lavapipe, and what the Vulkan build needs ---------
need=()
for pkg in libvulkan1 mesa-vulkan-drivers libvulkan-dev glslc spirv-headers; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || { say "missing ${need[*]} and no apt-get: install them with your package manager"; exit 2; }
  say "apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# --- SwiftShader's Vulkan ICD (lavapipe 22.3 lacks what Dawn, under WebGPU, requires) ------------
if [ ! -f "$SWIFTSHADER/vk_swiftshader_icd.json" ]; then
  say "extracting SwiftShader from Debian's chromium-common"
  work=$(mktemp -d)
  (cd "$work" && apt-get download chromium-common >/dev/null 2>&1) \
    || { apt-get update -qq && (cd "$work" && apt-get download chromium-common >/dev/null); }
  dpkg-deb -x "$work"/chromium-common_*.deb "$work/root"
  mkdir -p "$SWIFTSHADER.tmp"
  cp "$work/root/usr/lib/chromium/libvk_swiftshader.so" "$SWIFTSHADER.tmp/"
  # the package's ICD names the library relative to itself; make it absolute
  python3 - "$work/root/usr/lib/chromium/vk_swiftshader_icd.json" "$SWIFTSHADER/libvk_swiftshader.so" \
    "$SWIFTSHADER.tmp/vk_swiftshader_icd.json" <<'PY'
import json, sys
icd = json.load(open(sys.argv[1]))
icd["ICD"]["library_path"] = sys.argv[2]
json.dump(icd, open(sys.argv[3], "w"), indent=1)
PY
  rm -rf "$SWIFTSHADER" "$work"
  mv "$SWIFTSHADER.tmp" "$SWIFTSHADER"
fi

# --- ONNX Runtime's WebGPU provider ---------------------------------------------------------------
python -m pip install -q "onnxruntime-ep-webgpu==$WEBGPU_EP_VERSION"

# --- llama-cpp-python with the Vulkan backend -----------------------------------------------------
patch_id=$(sha256sum "$here/patch_ggml_vulkan.py" | cut -c1-12)
abi=$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
slot=$WHEELS/llama-cpp-python-$LLAMA_CPP_VERSION-vulkan-$abi-$(uname -m)-$patch_id
wheel=$(ls "$slot"/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  say "building llama-cpp-python $LLAMA_CPP_VERSION with Vulkan (about 10 minutes on 2 cores, once per machine)"
  work=$(mktemp -d)
  python -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$work"
  tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  src=$(ls -d "$work"/llama_cpp_python-*/)
  python3 "$here/patch_ggml_vulkan.py" "$src/vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp"
  start=$(date +%s)
  CMAKE_ARGS="-DGGML_VULKAN=on" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    python -m pip wheel -q --no-deps "$src" -w "$work/dist" > "$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log"; say "the Vulkan build failed (log above)"; exit 1; }
  say "built in $(( $(date +%s) - start )) s"
  mkdir -p "$slot.tmp" && cp "$work"/dist/llama_cpp_python-*.whl "$slot.tmp/"
  rm -rf "$slot" && mv "$slot.tmp" "$slot"
  rm -rf "$work"
  wheel=$(ls "$slot"/llama_cpp_python-*.whl | head -n 1)
fi
python -m pip install -q --force-reinstall --no-deps "$wheel"
python -m pip install -q "numpy>=1.24" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"

say "ready: SwiftShader in $SWIFTSHADER, llama-cpp-python (Vulkan) from $wheel"
