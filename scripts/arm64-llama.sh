#!/usr/bin/env bash
# Cross-compiles llama-cpp-python's vendored llama.cpp for aarch64 Linux, twice, and caches both as
# ready-to-import `llama_cpp` packages (the sdist's pure-Python package with its .so files in lib/):
#   armv8-a            runs on every ARM64 core (Cortex-A53/A72: Raspberry Pi 3/4)
#   armv8.2-a+dotprod  Cortex-A76 and newer (Pi 5, phones); dies with SIGILL on a Cortex-A72
# Only libggml-cpu differs between the two (GGML_CPU_ARM_ARCH), so the second build compiles that
# one library and takes libllama/libggml/libggml-base from the first. The C API's headers (llama.h,
# ggml*.h, gguf.h) are kept in include/, for building the C library against them (scripts/arm64-native.sh).
# No aarch64 wheel of llama-cpp-python exists; this is also what a board user can drop in
# (docs/mobile.md, "Linux boards").
#
# Usage: bash scripts/arm64-llama.sh   (prints the cache folder holding armv8-a/, armv8.2-a+dotprod/, include/)
# Needs: gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake ninja-build, and pip (to fetch the sdist).
# Cache: $EDGE_LORA_CACHE (default ~/.cache/edge-lora)/arm64/llama-cpp-python-VERSION-SCRIPTHASH.
set -euo pipefail

LLAMA_CPP_VERSION=0.3.36  # keep in step with scripts/software-gpu.sh and pyproject.toml
ARCHES=("armv8-a" "armv8.2-a+dotprod")  # the first is the full build; the others add libggml-cpu only
CACHE=${EDGE_LORA_CACHE:-$HOME/.cache/edge-lora}
script_id=$(sha256sum "$0" | cut -c1-12)  # a changed recipe is a new slot, never a stale library
slot=$CACHE/arm64/llama-cpp-python-$LLAMA_CPP_VERSION-$script_id

say() { printf 'arm64-llama: %s\n' "$*" >&2; }

if [ -f "$slot/done" ]; then echo "$slot"; exit 0; fi
for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++ cmake ninja; do
  command -v "$tool" >/dev/null || { say "missing $tool: apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake ninja-build"; exit 2; }
done
PY=${PYTHON:-python3}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say "fetching the llama-cpp-python $LLAMA_CPP_VERSION sdist"
"$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$work" 2>/dev/null
tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(ls -d "$work"/llama_cpp_python-*/)

configure() {  # $1 build dir, $2 GGML_CPU_ARM_ARCH
  nice -n 10 cmake -S "$src/vendor/llama.cpp" -B "$1" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
    -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
    -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$2" -DGGML_OPENMP=ON \
    -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >"$work/cmake-$2.log" 2>&1 \
    || { tail -n 30 "$work/cmake-$2.log"; say "cmake failed for $2"; exit 1; }
}

start=$(date +%s)
rm -rf "$slot.tmp" && mkdir -p "$slot.tmp"  # not a stale half-built one
first=""
for arch in "${ARCHES[@]}"; do
  build=$work/build-$arch
  configure "$build" "$arch"
  target=$([ -z "$first" ] && echo llama || echo ggml-cpu)
  say "building $target for $arch"
  nice -n 10 cmake --build "$build" --target "$target" -j "$(nproc)" >"$work/build-$arch.log" 2>&1 \
    || { tail -n 40 "$work/build-$arch.log"; say "build failed for $arch"; exit 1; }
  pkg=$slot.tmp/$arch/llama_cpp
  mkdir -p "$pkg/lib"
  cp -r "$src/llama_cpp/." "$pkg/"
  if [ -z "$first" ]; then
    find "$build" -name 'lib*.so*' -exec cp -P {} "$pkg/lib/" \;
    first=$pkg
  else
    cp -P "$first"/lib/lib*.so* "$pkg/lib/"
    find "$build" -name 'libggml-cpu.so*' -exec cp -P {} "$pkg/lib/" \;
  fi
  printf '%s\n' "$arch" >"$pkg/lib/ARM_ARCH"
done
mkdir -p "$slot.tmp/include"  # the headers of the C API the libraries were built from
cp "$src"/vendor/llama.cpp/include/*.h "$src"/vendor/llama.cpp/ggml/include/*.h "$slot.tmp/include/"
[ -f "$slot.tmp/include/llama.h" ] && [ -f "$slot.tmp/include/ggml.h" ] \
  || { say "llama.h or ggml.h missing from the sdist's vendor/llama.cpp"; exit 1; }
say "built in $(($(date +%s) - start)) s"
touch "$slot.tmp/done"
rm -rf "$slot" && mv "$slot.tmp" "$slot"
echo "$slot"
