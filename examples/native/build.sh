#!/usr/bin/env sh
# Build chat_adapters against libedge_lora (native/), itself built by scripts/native-build.sh against
# the llama.cpp that llama-cpp-python installed.
#   . .venv/bin/activate && sh examples/native/build.sh [OUT]      (prints OUT)
# The program finds libedge_lora.so in the build folder through its rpath (and llama.cpp through the
# library's). On Android / iOS an app links the same library built for the phone (docs/mobile.md).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$here/chat_adapters}
build=$(bash "$root/scripts/native-build.sh")  # fails here (with its message) when the library does not build
build=$(printf '%s\n' "$build" | tail -n 1)
if [ ! -f "$build/libedge_lora.so" ]; then
    echo "$build: no libedge_lora.so after scripts/native-build.sh (hint: delete the folder and build again)" >&2
    exit 1
fi
${CC:-cc} -O2 -std=c11 -Wall -Wextra -o "$out" "$here/chat_adapters.c" -I"$root/native/include" \
    -L"$build" -ledge_lora -Wl,-rpath,"$build"
echo "$out"
