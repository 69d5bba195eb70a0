#!/usr/bin/env bash
# An arm64 Debian userland (python3.11 and the C/C++ runtimes) plus the runtime's aarch64 wheels, for
# QEMU user-mode emulation; nothing here runs emulated. The rootfs comes from mmdebstrap's "extract"
# variant (no package scripts run, so no emulation), from this machine's own apt sources; the wheels
# are the aarch64 builds of the versions in the active (x86) environment, so both sides of the
# comparison run the same releases. The rootfs is also the sysroot the C library (native/) is
# cross-compiled against: glibc's headers, libsodium and cJSON (scripts/arm64-native.sh).
#
# Usage: . .venv/bin/activate && bash scripts/arm64-userland.sh   (prints ROOTFS and SITE, one a line)
# Cache: $EDGE_LORA_CACHE (default ~/.cache/edge-lora)/arm64/{rootfs-*,site-*}.
set -euo pipefail

PACKAGES=python3,libpython3.11,libstdc++6,libgomp1,libc6-dev,libsodium-dev,libsodium23,libcjson-dev,libcjson1
WHEELS=(numpy safetensors tokenizers onnxruntime gguf jinja2 diskcache typing-extensions)
CACHE=${EDGE_LORA_CACHE:-$HOME/.cache/edge-lora}/arm64

say() { printf 'arm64-userland: %s\n' "$*" >&2; }

. /etc/os-release
rootfs=$CACHE/rootfs-${VERSION_CODENAME:-unknown}-$(echo "$PACKAGES" | sha256sum | cut -c1-8)
if [ ! -x "$rootfs/usr/bin/python3" ]; then
  command -v mmdebstrap >/dev/null || { say "missing mmdebstrap: apt-get install mmdebstrap"; exit 2; }
  sources=""
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    [ -s "$f" ] && { sources=$f; break; }
  done
  [ -n "$sources" ] || { say "no Debian apt source on this machine to build the arm64 rootfs from"; exit 2; }
  say "arm64 rootfs ($VERSION_CODENAME: $PACKAGES) from $sources"
  rm -rf "$rootfs.tmp" && mkdir -p "$CACHE"
  mmdebstrap --quiet --arch=arm64 --variant=extract --include="$PACKAGES" "$VERSION_CODENAME" "$rootfs.tmp" - \
    <"$sources" >/dev/null
  rm -rf "$rootfs" && mv "$rootfs.tmp" "$rootfs"
fi
py_version=$("$rootfs/usr/bin/python3" --version 2>/dev/null || readlink "$rootfs/usr/bin/python3")
py_version=$(echo "$py_version" | grep -o '3\.[0-9]*' | head -n 1)

# Pin every wheel to the version the x86 side runs (the comparison is of kernels, not of releases).
pins=()
for name in "${WHEELS[@]}"; do
  v=$(python -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null) \
    || { say "$name is not installed in the active environment: pip install -e '.[all]' first"; exit 2; }
  pins+=("$name==$v")
done
site=$CACHE/site-py$py_version-$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-12)
if [ ! -f "$site/.done" ]; then
  say "aarch64 wheels for python $py_version: ${pins[*]}"
  rm -rf "$site.tmp"
  python -m pip install -q --target "$site.tmp" --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 --python-version "$py_version" \
    --implementation cp --only-binary=:all: "${pins[@]}" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  for name in "${WHEELS[@]}"; do  # pip's warnings are not errors; a missing package is
    ls -d "$site.tmp"/*.dist-info 2>/dev/null | grep -qi "/${name//-/_}-" \
      || { say "no aarch64 wheel of $name was installed"; exit 1; }
  done
  touch "$site.tmp/.done"
  rm -rf "$site" && mv "$site.tmp" "$site"
fi
echo "$rootfs"
echo "$site"
