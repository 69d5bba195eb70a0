#!/usr/bin/env bash
# Builds the C library (native/) against the llama.cpp that llama-cpp-python installed (its
# include/ and llama_cpp/lib/), with the C test program and the fuzz driver.
#   . .venv/bin/activate && bash scripts/native-build.sh [BUILD_DIR]     (prints BUILD_DIR)
#   EDGE_LORA_SANITIZE=address,undefined   the sanitizer build (a separate BUILD_DIR)
# Default BUILD_DIR: $EDGE_LORA_CACHE/native/<hash of the sources, llama.cpp and the sanitizers>, so
# an unchanged tree is not built again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
bash scripts/native-deps.sh
pkg=$("$PY" -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))' 2>/dev/null) \
  || { echo "native-build: $PY cannot import llama_cpp (hint: activate the project's venv, or set PYTHON)" >&2; exit 2; }
include=$(dirname "$pkg")/include
lib=$pkg/lib
[ -f "$include/llama.h" ] || { echo "native-build: llama.h not found under $include (hint: install llama-cpp-python from source, scripts/software-gpu.sh)" >&2; exit 2; }
sanitize=${EDGE_LORA_SANITIZE:-}
key=$( (find native -type f \( -name '*.c' -o -name '*.h' -o -name CMakeLists.txt \) -print0 | sort -z | xargs -0 sha256sum;
        sha256sum "$include/llama.h" "$lib/libllama.so"; echo "$sanitize") | sha256sum | cut -c1-16)
build=${1:-${EDGE_LORA_CACHE:-$HOME/.cache/edge-lora}/native/$key${sanitize:+-san}}
mkdir -p "$(dirname "$build")"  # the log lands beside the build folder, before cmake makes it
if [ ! -f "$build/done" ]; then
  cmake -S native -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DEDGE_LORA_LLAMA_INCLUDE_DIR="$include" -DEDGE_LORA_LLAMA_LIB_DIR="$lib" \
    -DEDGE_LORA_SANITIZE="$sanitize" >"$build.log" 2>&1 || { cat "$build.log" >&2; exit 1; }
  cmake --build "$build" >>"$build.log" 2>&1 || { tail -n 60 "$build.log" >&2; exit 1; }
  touch "$build/done"
fi
echo "$build"
