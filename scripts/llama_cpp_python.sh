#!/usr/bin/env bash
# Builds llama-cpp-python (pinned 0.3.36) once into a virtual environment outside the
# checkout and prints that environment's python; later calls only print it. The heavy GGUF
# export tests (tests/test_gguf_export_llama.py) run llama.cpp through it in a subprocess, so
# the checkout's own environment is untouched. Several minutes on 2 cores the first time.
#
#   bash scripts/llama_cpp_python.sh        # prints .../venv/bin/python
#
# Built with -DGGML_NATIVE=OFF: a native build takes llama.cpp's AMX path on these machines'
# CPUs and crashes on the first decode (see ../shared/data/README.md). The sdist is taken from
# $LLAMA_CPP_SDIST when that file exists, else downloaded from PyPI.
set -euo pipefail
version="0.3.36"
cache="${LOWBIT_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/lowbit/tools}/llama-cpp-python-$version"
if "$cache/venv/bin/python" -c "import llama_cpp" >/dev/null 2>&1; then
  echo "$cache/venv/bin/python"; exit 0
fi
echo "building llama-cpp-python $version into $cache; several minutes on 2 cores" >&2
rm -rf "$cache"   # a build that was cut off: start again
"${PYTHON:-python3}" -m venv "$cache/venv"
sdist="${LLAMA_CPP_SDIST:-/tmp/sdist/llama_cpp_python-$version.tar.gz}"
[[ -f "$sdist" ]] || sdist="llama-cpp-python==$version"
CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  nice "$cache/venv/bin/python" -m pip install -q --no-binary llama-cpp-python "$sdist" >&2
"$cache/venv/bin/python" -c "import llama_cpp" >&2   # importable only once complete: the check above
echo "$cache/venv/bin/python"
