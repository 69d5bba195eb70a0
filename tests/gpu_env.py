"""The software-GPU switches, set here by the test setup and never by the library.

On a machine without a GPU, ``scripts/software-gpu.sh`` installs Mesa's lavapipe (a Vulkan driver
that runs on the CPU), ONNX Runtime's WebGPU plugin and a Vulkan build of llama-cpp-python. The
tests then let WebGPU take a software adapter and name lavapipe to llama.cpp, which skips
CPU-type Vulkan devices otherwise. On a machine with a real GPU none of this is needed, and a
switch the environment already sets wins.

``EDGE_LORA_REQUIRE_GPU=1`` (CI) turns "no GPU here" from a skip into a failure.
"""

from __future__ import annotations

import os

SETUP_HINT = "run scripts/software-gpu.sh in this environment (or use a machine with a GPU)"


def enable_software_gpu() -> None:
    """Set the switches before onnxruntime or llama_cpp is imported (their Vulkan loaders read them once).

    ``GGML_VK_DISABLE_F16`` makes llama.cpp's shaders compute in f32: the 1e-3 agreement the fp32
    tests ask for is a statement about f32 arithmetic (with f16, as on most real GPUs, the tiny
    models differ by ~3e-3 to 1e-2; the 4-bit tests' greedy agreement covers that)."""
    os.environ.setdefault("ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER", "1")
    os.environ.setdefault("GGML_VK_VISIBLE_DEVICES", "0")
    os.environ.setdefault("GGML_VK_DISABLE_F16", "1")


def gpu_required() -> bool:
    return os.environ.get("EDGE_LORA_REQUIRE_GPU") == "1"
