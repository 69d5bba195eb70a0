#!/usr/bin/env sh
# Build lora_swap against the llama.cpp that llama-cpp-python installed (header + libllama.so).
#   PYTHON=.venv/bin/python examples/native/build.sh [OUT]
# On Android / iOS the same C calls link against the llama.cpp your app builds (see docs/mobile.md).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
out=${1:-$here/lora_swap}
pkg=$("$python" -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')
include=$(dirname "$pkg")/include
lib=$pkg/lib
if [ ! -f "$include/llama.h" ]; then
    echo "error: llama.h not found under $include (hint: reinstall llama-cpp-python from source)" >&2
    exit 1
fi
${CC:-cc} -O2 -std=c11 -Wall -Wextra -o "$out" "$here/lora_swap.c" -I"$include" -L"$lib" -lllama -lggml -lggml-base \
    -Wl,-rpath,"$lib"
echo "$out"
