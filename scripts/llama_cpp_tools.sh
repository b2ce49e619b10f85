#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity)
# from the llama.cpp sources vendored in the pinned llama-cpp-python sdist, once, into a
# cache outside the checkout; later calls only print the folder. The heavy GGUF checks and
# bench/gguf_llamacpp.py use them. About ten minutes on 2 cores the first time.
#
#   bash scripts/llama_cpp_tools.sh        # prints the folder holding the binaries
#
# Built with -DGGML_NATIVE=OFF: a native build takes llama.cpp's AMX path on these
# machines' CPUs and crashes on the first decode (see ../shared/data/README.md).
set -euo pipefail
version="0.3.36"
cache="${LOWBIT_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/lowbit/tools}/llama.cpp-$version"
tools=(llama-quantize llama-imatrix llama-perplexity)
if [[ -x "$cache/bin/llama-perplexity" ]]; then
  echo "$cache/bin"; exit 0
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/lowbit-llama.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "building llama.cpp's tools (llama-cpp-python $version sources) into $cache; about ten minutes on 2 cores" >&2
"${PYTHON:-python3}" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$work/build" -j "$(nproc)" --target "${tools[@]}" >&2
mkdir -p "$cache.partial/bin"
for tool in "${tools[@]}"; do cp "$work/build/bin/$tool" "$cache.partial/bin/"; done
rm -rf "$cache"; mv "$cache.partial" "$cache"
echo "$cache/bin"
