#!/usr/bin/env bash
# Sets up the GPU half of the runtime on a machine with no GPU, into the active Python environment:
#   - Mesa's lavapipe, a Vulkan driver that runs on the CPU, at version 25 or newer: Debian 12's own
#     22.3 is refused by Dawn (ONNX Runtime's WebGPU: "shaderUniform*ArrayDynamicIndexing required")
#     and corrupts the heap under llama.cpp after an adapter swap; 25.0 from bookworm-backports runs both;
#   - ONNX Runtime's WebGPU provider (pip onnxruntime-ep-webgpu);
#   - llama-cpp-python built with llama.cpp's Vulkan backend, the wheel cached so that a machine pays
#     the 6-10 minutes of the build once.
# On a machine with a real GPU and its driver, only the two Python packages matter; the tests set
# the software-device switches (ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER, GGML_VK_VISIBLE_DEVICES)
# themselves, the library never does (tests/gpu_env.py).
#
# Usage: . .venv/bin/activate && bash scripts/software-gpu.sh
# Cache: $EDGE_LORA_CACHE (default ~/.cache/edge-lora)/wheels.
set -euo pipefail

LLAMA_CPP_VERSION=0.3.36  # the version DESIGN.md's checks were made with; keep in step with pyproject.toml
WEBGPU_EP_VERSION=0.4.0
MESA_MIN=25
CACHE=${EDGE_LORA_CACHE:-$HOME/.cache/edge-lora}
WHEELS=$CACHE/wheels
here=$(cd "$(dirname "$0")" && pwd)

say() { printf 'software-gpu: %s\n' "$*"; }

if [ -z "${VIRTUAL_ENV:-}" ] && [ "${EDGE_LORA_ANY_PYTHON:-0}" != 1 ]; then
  say "activate the project's virtual environment first (or set EDGE_LORA_ANY_PYTHON=1)"; exit 2
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
mesa_major() { dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | cut -d. -f1; }

# --- system packages: the Vulkan loader, lavapipe, and what the Vulkan build needs ----------------
need=()
for pkg in libvulkan1 libvulkan-dev glslc spirv-headers; do installed "$pkg" || need+=("$pkg"); done
if [ ${#need[@]} -gt 0 ] || [ "$(mesa_major || echo 0)" -lt $MESA_MIN ] 2>/dev/null || ! installed mesa-vulkan-drivers; then
  command -v apt-get >/dev/null || { say "install libvulkan1, Mesa >= $MESA_MIN (lavapipe), glslc and spirv-headers with your package manager"; exit 2; }
  apt-get update -qq
  target=()
  if [ "$(apt-cache policy mesa-vulkan-drivers | sed -n 's/ *Candidate: *\([0-9]*\).*/\1/p')" -lt $MESA_MIN ]; then
    # backports from the mirror the machine's own apt sources name (never a host written here)
    suite=$(bash "$here/enable-backports.sh") \
      || { say "this release's Mesa is older than $MESA_MIN: install a newer mesa-vulkan-drivers (lavapipe) by hand"; exit 2; }
    say "Mesa from $suite (the release's own is older than $MESA_MIN)"
    target=(-t "$suite")
  fi
  say "apt-get install ${need[*]} mesa-vulkan-drivers"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${target[@]}" mesa-vulkan-drivers >/dev/null
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

say "ready: Mesa $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers), llama-cpp-python (Vulkan) from $wheel"
