#!/usr/bin/env bash
# The ARM64 lane: the torch-free runtime under QEMU user-mode arm64 emulation on three cores (Cortex-A76:
# Pi 5 class, dotprod; Cortex-A72: Pi 4 class, no dotprod; max: SVE2, i8mm, SME), both backends, every
# quantization the export offers, adapters active / swapped / stacked / DoRA / new tokens / merged,
# against the same runtime on this x86-64 host. Fails when an ARM result leaves its tolerance
# (scripts/arm64_compare.py). Also proves the llama.cpp build choice: the armv8-a build on the A72
# and on the A76, the dotprod build on the A76 and max, and the dotprod build dying with SIGILL on an A72.
# And the C library (native/), cross-compiled, with its fuzz driver and C test program emulated on the
# A76 and the A72 (scripts/arm64-native.sh).
#
# Usage: . .venv/bin/activate && bash scripts/arm64-lane.sh
#   EDGE_LORA_ARM64_WORK=DIR   keep bundles and results there, bundles reused when present (default: a
#                              fresh temporary folder, removed when the lane passes)
#   EDGE_LORA_ARM64_PERTURB=kv-f16   a deliberately wrong setting on the ARM side: the lane must fail
# Cache: $EDGE_LORA_CACHE (default ~/.cache/edge-lora)/arm64 (rootfs, wheels, cross-built llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."

QEMU_MIN=10  # Debian 12's 7.2 passes the host's /proc/cpuinfo through and onnxruntime's import segfaults
say() { printf 'arm64-lane: %s\n' "$*"; }
start=$(date +%s)
lap() { say "$1 ($(($(date +%s) - start)) s so far)"; }

if [ -z "${VIRTUAL_ENV:-}" ] && [ "${EDGE_LORA_ANY_PYTHON:-0}" != 1 ]; then
  say "activate the project's virtual environment first (or set EDGE_LORA_ANY_PYTHON=1)"; exit 2
fi

# --- system packages ---------------------------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
qemu_major() { qemu-aarch64-static --version 2>/dev/null | sed -n 's/.*version \([0-9]*\).*/\1/p' | head -n 1; }
need=()
for pkg in mmdebstrap gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake ninja-build; do
  installed "$pkg" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ] || [ "$(qemu_major || echo 0)" -lt $QEMU_MIN ] 2>/dev/null; then
  command -v apt-get >/dev/null || { say "install qemu-user-static >= $QEMU_MIN, mmdebstrap, gcc/g++-aarch64-linux-gnu, cmake, ninja"; exit 2; }
  suite=$(bash scripts/enable-backports.sh)
  apt-get update -qq
  say "apt-get install qemu-user-static ($suite) ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t "$suite" qemu-user-static >/dev/null
  [ ${#need[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ "$(qemu_major)" -ge $QEMU_MIN ] || { say "qemu-aarch64-static $(qemu_major) is older than $QEMU_MIN"; exit 2; }
lap "system packages ready (qemu $(qemu_major))"

# --- arm64 userland, wheels, llama.cpp (cached) ------------------------------------------------------
userland=$(bash scripts/arm64-userland.sh)  # two lines: ROOTFS, SITE (a failure stops here)
rootfs=$(sed -n 1p <<<"$userland") site=$(sed -n 2p <<<"$userland")
python=$(readlink -f "$rootfs/usr/bin/python3")
lap "arm64 rootfs and wheels ready"
llama=$(bash scripts/arm64-llama.sh)
lap "cross-built llama.cpp ready: $llama"

work=${EDGE_LORA_ARM64_WORK:-$(mktemp -d -t edge-lora-arm64.XXXXXX)}
mkdir -p "$work"

# --- the C library: cross-built against the rootfs and llama.cpp above, its own tests emulated ------
EDGE_LORA_ARM64_ROOTFS=$rootfs EDGE_LORA_ARM64_LLAMA=$llama bash scripts/arm64-native.sh "$work/native"
lap "C library tested on the emulated Cortex-A76 and Cortex-A72"

# --- x86 reference, then the emulated cores ----------------------------------------------------------
rm -f "$work"/arm64-*.npz "$work"/arm64-*.json
env -u EDGE_LORA_ARM64_PERTURB HF_HUB_DISABLE_PROGRESS_BARS=1 python scripts/arm64_check.py reference --work "$work"
lap "x86 reference done"

arm() {  # QEMU_CPU, then arm64_check.py run's options
  local cpu=$1
  shift
  QEMU_CPU=$cpu qemu-aarch64-static -L "$rootfs" "$python" -E -s scripts/arm64_check.py run \
    --work "$work" --cpu "$cpu" --llama "$llama" --site "$site" "$@"
}
# two emulated Pythons at a time (CI has 2 cores); each writes its own log, shown on failure
pids=()
for cpu in max cortex-a76 cortex-a72; do  # the slowest to emulate first
  (arm "$cpu" >"$work/$cpu.log" 2>&1 || { tail -n 30 "$work/$cpu.log"; exit 1; }) &
  pids+=($!)
  if [ ${#pids[@]} -eq 2 ]; then wait "${pids[0]}"; pids=("${pids[1]}"); fi
done
(arm cortex-a76 --build armv8-a --out arm64-cortex-a76-armv8-a \
  --only llama/llamacpp/f32 llama/llamacpp/q8_0 llama/llamacpp/q4_0 >"$work/a76-armv8-a.log" 2>&1 \
  || { tail -n 30 "$work/a76-armv8-a.log"; exit 1; })
for pid in "${pids[@]}"; do wait "$pid"; done
lap "emulated runs done"

# The pick is not a preference: the dotprod build must die with SIGILL on a core without dotprod.
set +e
arm cortex-a72 --build armv8.2-a+dotprod --out sigill-a72 --only llama/llamacpp/q4_0 >"$work/sigill.log" 2>&1
rc=$?
set -e
if [ $rc -ne 132 ]; then
  tail -n 20 "$work/sigill.log"
  say "FAIL: the armv8.2-a+dotprod build on a Cortex-A72 exited $rc, not SIGILL (132): the pick proves nothing"
  exit 1
fi
say "the armv8.2-a+dotprod build dies with SIGILL on a Cortex-A72, as it should (the lane picks armv8-a there)"

python scripts/arm64_check.py compare --work "$work" ${EDGE_LORA_ARM64_VERBOSE:+--verbose}
[ -n "${EDGE_LORA_ARM64_WORK:-}" ] || rm -rf "$work"  # kept on a failure, for its logs
lap "ARM64 lane done"
