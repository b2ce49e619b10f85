#!/usr/bin/env bash
# Builds llama.cpp's block quantizers (ggml/src/ggml-quants.c, from the llama.cpp sources
# vendored in the pinned llama-cpp-python sdist) as a small shared library, once, into a
# cache outside the checkout; later calls only print its path. tests/test_gguf_blocks_ggml.py
# calls quantize_row_*_ref / quantize_* / dequantize_row_* through ctypes and compares bytes
# with lowbit's torch code. A few seconds to compile (plus the sdist download).
#
#   bash scripts/ggml_quants_lib.sh        # prints the path of the .so
#
# Compiled for baseline x86-64 with -ffp-contract=off, as the portable (GGML_NATIVE=OFF)
# build compiles ggml-base: no fused multiply-adds, so float32 results follow the C source's
# operation order (a -march=native build may contract a*b+c into an FMA and round differently).
set -euo pipefail
version="0.3.36"
cache="${LOWBIT_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/lowbit/tools}"
lib="$cache/ggml-quants-$version.so"
if [[ -f "$lib" ]]; then
  echo "$lib"; exit 0
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/lowbit-ggml-quants.XXXXXX")"
trap 'rm -rf "$work"' EXIT
sdist="${LOWBIT_LLAMA_SDIST:-}"
if [[ -z "$sdist" ]]; then
  "${PYTHON:-python3}" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" >&2
  sdist="$work/llama_cpp_python-$version.tar.gz"
fi
tar -xzf "$sdist" -C "$work" "llama_cpp_python-$version/vendor/llama.cpp/ggml"
ggml="$work/llama_cpp_python-$version/vendor/llama.cpp/ggml"
# the few ggml symbols ggml-quants.c needs besides itself: sizes of the types it quantizes
# (quantize_* returns nrow * ggml_row_size) and ggml_abort
cat > "$work/shim.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>
#include "ggml.h"
#include "ggml-common.h"
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    va_list args; va_start(args, fmt);
    fprintf(stderr, "%s:%d: ", file, line); vfprintf(stderr, fmt, args); fputc('\n', stderr);
    va_end(args); abort();
}
static void geometry(enum ggml_type type, size_t * block, size_t * bytes) {
    switch (type) {
        case GGML_TYPE_Q4_0: *block = QK4_0; *bytes = sizeof(block_q4_0); return;
        case GGML_TYPE_Q4_1: *block = QK4_1; *bytes = sizeof(block_q4_1); return;
        case GGML_TYPE_Q5_0: *block = QK5_0; *bytes = sizeof(block_q5_0); return;
        case GGML_TYPE_Q5_1: *block = QK5_1; *bytes = sizeof(block_q5_1); return;
        case GGML_TYPE_Q8_0: *block = QK8_0; *bytes = sizeof(block_q8_0); return;
        case GGML_TYPE_Q2_K: *block = QK_K; *bytes = sizeof(block_q2_K); return;
        case GGML_TYPE_Q3_K: *block = QK_K; *bytes = sizeof(block_q3_K); return;
        case GGML_TYPE_Q4_K: *block = QK_K; *bytes = sizeof(block_q4_K); return;
        case GGML_TYPE_Q5_K: *block = QK_K; *bytes = sizeof(block_q5_K); return;
        case GGML_TYPE_Q6_K: *block = QK_K; *bytes = sizeof(block_q6_K); return;
        case GGML_TYPE_IQ4_NL: *block = QK4_NL; *bytes = sizeof(block_iq4_nl); return;
        case GGML_TYPE_IQ4_XS: *block = QK_K; *bytes = sizeof(block_iq4_xs); return;
        default: fprintf(stderr, "ggml-quants shim: type %d not covered\n", (int) type); abort();
    }
}
size_t ggml_type_size(enum ggml_type type) { size_t b, n; geometry(type, &b, &n); return n; }
size_t ggml_row_size(enum ggml_type type, int64_t ne) { size_t b, n; geometry(type, &b, &n); return n * ne / b; }
const char * ggml_type_name(enum ggml_type type) { (void) type; return "?"; }
C
cflags=(-O2 -DNDEBUG -fPIC -ffp-contract=off -fno-fast-math -I"$ggml/include" -I"$ggml/src" -I"$ggml/src/ggml-cpu")
gcc "${cflags[@]}" -DGGML_COMMON_DECL_C -DGGML_COMMON_IMPL_C -c "$work/shim.c" -o "$work/shim.o"
gcc "${cflags[@]}" -c "$ggml/src/ggml-quants.c" -o "$work/ggml-quants.o"
mkdir -p "$cache"
gcc -shared -o "$lib.partial-$$" "$work/ggml-quants.o" "$work/shim.o" -lm
mv "$lib.partial-$$" "$lib"
echo "$lib"
