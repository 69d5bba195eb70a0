#!/usr/bin/env bash
# The C library (native/) on ARM64: cross-compiled for aarch64 with CMake against the arm64 rootfs
# (the sysroot: glibc, libsodium, cJSON; scripts/arm64-userland.sh) and the cross-built llama.cpp
# (headers and libraries; scripts/arm64-llama.sh), then run under QEMU user-mode on a Cortex-A76
# (Pi 5 class, with the armv8.2-a+dotprod llama.cpp) and a Cortex-A72 (Pi 4 class, armv8-a): the fuzz
# driver on the parsers, and the C test program on a bundle exported on this x86-64 host (a bundle is
# the same on every architecture). The test program checks the library against itself (precise
# kernels, swaps and stacks against fresh engines, threads, cancel, errors), so emulation proves the
# results, never the speed. Fails when a build or a check fails.
#
# Usage: . .venv/bin/activate && bash scripts/arm64-native.sh [WORK]
#   WORK   where the test bundle is exported, and reused when present (default: a temporary folder)
#   EDGE_LORA_ARM64_ROOTFS, EDGE_LORA_ARM64_LLAMA   the rootfs and llama.cpp folders when already known
#          (scripts/arm64-lane.sh passes them); otherwise the two scripts print them (both cached)
# Cache: $EDGE_LORA_CACHE (default ~/.cache/edge-lora)/arm64/native-KEY, KEY a hash of native/'s
# sources, this script, the rootfs and the llama.cpp folder: an unchanged tree is not built again.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_ITERATIONS=2000
CORES=("cortex-a76:armv8.2-a+dotprod" "cortex-a72:armv8-a")  # QEMU_CPU:the llama.cpp build it runs
TIMEOUT=${EDGE_LORA_ARM64_NATIVE_TIMEOUT:-1200}  # seconds for one emulated program
CACHE=${EDGE_LORA_CACHE:-$HOME/.cache/edge-lora}/arm64
say() { printf 'arm64-native: %s\n' "$*"; }
fail() { say "$*" >&2; exit 1; }
start=$(date +%s)

for tool in aarch64-linux-gnu-gcc cmake ninja qemu-aarch64-static; do
  command -v "$tool" >/dev/null \
    || { say "missing $tool (hint: bash scripts/arm64-lane.sh installs the cross compiler, cmake, ninja and qemu)" >&2; exit 2; }
done
rootfs=${EDGE_LORA_ARM64_ROOTFS:-$(bash scripts/arm64-userland.sh | sed -n 1p)}
llama=${EDGE_LORA_ARM64_LLAMA:-$(bash scripts/arm64-llama.sh)}
[ -n "$(ls native/fuzz/corpus 2>/dev/null)" ] \
  || fail "native/fuzz/corpus: missing or empty (hint: python native/fuzz/make_corpus.py writes it)"
for f in "$rootfs/usr/include/sodium.h" "$rootfs/usr/include/cjson/cJSON.h" "$llama/include/llama.h"; do
  [ -f "$f" ] || fail "$f: missing (hint: the rootfs or llama.cpp folder is from an older recipe; rerun scripts/arm64-userland.sh and scripts/arm64-llama.sh)"
done

# --- cross-compile (cached) --------------------------------------------------------------------------
key=$( (find native -type f \( -name '*.c' -o -name '*.h' -o -name CMakeLists.txt \) -print0 | sort -z | xargs -0 sha256sum
        sha256sum scripts/arm64-native.sh; echo "$rootfs $llama") | sha256sum | cut -c1-16)
build=$CACHE/native-$key
if [ ! -f "$build/done" ]; then
  rm -rf "$build" && mkdir -p "$build"
  # CMAKE_SYSROOT: the compiler and linker take glibc from the rootfs, and find_path/find_library look
  # there first (sodium.h, cjson/cJSON.h, the arm64 libsodium and libcjson); llama.cpp by its own paths.
  # -rpath-link: with a sysroot, ld looks for libedge_lora's libllama under the sysroot (its RUNPATH
  # prefixed with it) when it links the test program, so it is told where they are.
  lib=$llama/armv8-a/llama_cpp/lib
  nice -n 10 cmake -S native -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc \
    -DCMAKE_SYSROOT="$rootfs" -DCMAKE_FIND_ROOT_PATH="$rootfs" \
    -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$lib" \
    -DEDGE_LORA_LLAMA_INCLUDE_DIR="$llama/include" -DEDGE_LORA_LLAMA_LIB_DIR="$lib" \
    >"$build/configure.log" 2>&1 || { tail -n 30 "$build/configure.log" >&2; fail "$build: cmake configure failed"; }
  for var in SODIUM_INCLUDE_DIR SODIUM_LIB CJSON_INCLUDE_DIR CJSON_LIB; do  # never the host's x86 ones
    found=$(sed -n "s/^$var:[A-Z]*=//p" "$build/CMakeCache.txt")
    case $found in "$rootfs"/*) ;; *) fail "$build: $var is $found, not in the rootfs $rootfs" ;; esac
  done
  nice -n 10 cmake --build "$build" -j "$(nproc)" >"$build/build.log" 2>&1 \
    || { tail -n 40 "$build/build.log" >&2; fail "$build: cross build failed (log: $build/build.log)"; }
  for program in libedge_lora.so test_edge_lora fuzz_parsers; do
    [ "$(od -An -tx1 -j18 -N2 "$build/$program" | tr -d ' ')" = b700 ] || fail "$build/$program: not an aarch64 ELF file"
  done
  touch "$build/done"
  say "cross-built in $(($(date +%s) - start)) s: $build"
else
  say "cross build cached: $build"
fi

# --- the bundle, exported on this host ---------------------------------------------------------------
work=${1:-}
if [ -z "$work" ]; then
  work=$(mktemp -d -t edge-lora-arm64-native.XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
bundle=$(HF_HUB_DISABLE_PROGRESS_BARS=1 python scripts/arm64_native_bundle.py "$work" | tail -n 1)
[ -f "$bundle/bundle.json" ] || fail "$work: the bundle export failed"

# --- under QEMU --------------------------------------------------------------------------------------
emulate() {  # QEMU_CPU, llama.cpp build, log name, then the program and its arguments
  local cpu=$1 arch=$2 log=$work/$3.log t0
  shift 3
  t0=$(date +%s)
  # the guest's loader takes libedge_lora and llama.cpp from LD_LIBRARY_PATH (these host folders are
  # not in the rootfs, so qemu -L passes them through), libsodium, libcjson and glibc from the rootfs
  if ! QEMU_CPU=$cpu LD_LIBRARY_PATH="$build:$llama/$arch/llama_cpp/lib" timeout "$TIMEOUT" \
      qemu-aarch64-static -L "$rootfs" "$@" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    fail "$(basename "$1") failed on an emulated $cpu with llama.cpp $arch (log: $log)"
  fi
  say "$cpu ($arch): $(tail -n 1 "$log") [$(($(date +%s) - t0)) s]"
}
for core in "${CORES[@]}"; do
  cpu=${core%%:*} arch=${core#*:}
  emulate "$cpu" "$arch" "fuzz-$cpu" "$build/fuzz_parsers" native/fuzz/corpus "$FUZZ_ITERATIONS"
  emulate "$cpu" "$arch" "test-$cpu" "$build/test_edge_lora" "$bundle" a b x
done
say "done in $(($(date +%s) - start)) s"
