#!/usr/bin/env bash
# Builds llama-server and llama-quantize for benchmarks/serve.py (a benchmark-only step, ~10 min on 2 cores):
# the llama.cpp source vendored in the llama-cpp-python==0.3.36 sdist, cmake -DLLAMA_CURL=OFF -DGGML_NATIVE=ON.
# Cached outside the repo (default ~/.cache/gpt2chat-ci, as CI caches the llama-cpp-python wheel); a cache
# that already holds the binaries is reused as it is.   usage: bash benchmarks/build_llama_server.sh [CACHE]
set -euo pipefail
VERSION=0.3.36
CACHE=${1:-$HOME/.cache/gpt2chat-ci}
PYTHON=${PYTHON:-python}
OUT=$CACHE/llama-server-$VERSION
if [ -x "$OUT/bin/llama-server" ] && [ -x "$OUT/bin/llama-quantize" ]; then
  echo "$OUT/bin/llama-server (cached)"; exit 0
fi
SDIST_DIR=$CACHE/llama-cpp-python-$VERSION
mkdir -p "$SDIST_DIR/src"
SDIST=$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz
[ -f "$SDIST" ] || "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
[ -d "$SDIST_DIR/src/llama_cpp_python-$VERSION" ] || tar -xzf "$SDIST" -C "$SDIST_DIR/src"
SRC=$SDIST_DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp
cmake -S "$SRC" -B "$OUT" -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release > "$OUT.cmake.log" 2>&1
cmake --build "$OUT" -j "$(nproc)" --target llama-server llama-quantize > "$OUT.build.log" 2>&1
echo "$OUT/bin/llama-server"
