#!/usr/bin/env bash
# The C library's build dependencies from the OS (native/CMakeLists.txt): a C compiler, CMake, Ninja,
# libsodium (SHA-256, Ed25519) and cJSON. Installs what is missing with apt (the machine's own sources).
# Usage: bash scripts/native-deps.sh
set -euo pipefail
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
need=()
for pkg in gcc cmake ninja-build pkg-config libsodium-dev libcjson-dev; do
  installed "$pkg" || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
command -v apt-get >/dev/null || { echo "native-deps: install ${need[*]} (a C compiler, cmake, ninja, libsodium, cJSON)" >&2; exit 2; }
echo "native-deps: apt-get install ${need[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
