#!/usr/bin/env bash
# Adds the release's backports suite to apt, from the mirror this machine already uses: the URI of
# the first Debian source in its own apt configuration (deb822 *.sources files, then one-line
# sources.list entries), never a host typed here, so it works behind any mirror.
#
# Usage: bash scripts/enable-backports.sh   (prints the suite it enabled, e.g. bookworm-backports)
set -euo pipefail

say() { printf 'enable-backports: %s\n' "$*" >&2; }

. /etc/os-release
[ "${ID:-}" = debian ] || { say "not Debian (${ID:-unknown}): install the packages from your distribution"; exit 2; }
suite="${VERSION_CODENAME}-backports"
target=/etc/apt/sources.list.d/edge-lora-backports.sources

# The first URI of a source that serves this release's main suite (not -security): deb822 first.
mirror=""
for file in /etc/apt/sources.list.d/*.sources; do
  [ -f "$file" ] && [ "$file" != "$target" ] || continue
  mirror=$(awk -v rel="$VERSION_CODENAME" '
    /^URIs:/   { uris = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == rel) found = uris }
    /^$/       { if (found) { print found; exit } uris = "" }
    END        { if (found) print found }' "$file" | head -n 1)
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk -v rel="$VERSION_CODENAME" '$1 == "deb" && $0 ~ (" " rel " ") {
    for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list | head -n 1)
fi
[ -n "$mirror" ] || { say "no apt source for ${VERSION_CODENAME} found to take the mirror from"; exit 2; }

if ! grep -qs "Suites: $suite" "$target" || ! grep -qs "URIs: $mirror" "$target"; then
  printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" "$suite" > "$target.tmp"
  mv "$target.tmp" "$target"
  say "added $suite from $mirror"
  apt-get update -qq
fi
echo "$suite"
