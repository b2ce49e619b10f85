"""Quantization time of lowbit's GGUF block formats against llama.cpp's own C code.

    python bench/gguf_blocks.py [--size 4096] [--threads N] [--types Q4_K,Q6_K] [--repeat 1]

For each block type, with and without an importance vector (the imatrix path), quantizes a
``size x size`` float32 matrix (normal, std 0.02: a Llama-like weight) with
``lowbit.formats.gguf_blocks.quantize_ggml`` (torch, ``--threads`` intra-op threads) and with
llama.cpp's ``quantize_<type>`` from the vendored ggml-quants.c (``scripts/ggml_quants_lib.sh``
builds it; called through ctypes on ``--threads`` Python threads, each taking a share of the
rows, as llama-quantize's worker threads do). Checks that the bytes are equal, and reports the
seconds of each (best of ``--repeat``) and their ratio. Prints a table and writes
``bench/results/gguf-blocks-cpu-<date>.json``.

Run it on an idle machine: the two sides are timed one after the other, so load from other
processes skews the ratio.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
# the repository first on the path: lowbit from this checkout
sys.path.insert(0, str(ROOT))

from lowbit.formats.gguf_blocks import BLOCK_TYPES, quantize_ggml
from lowbit.formats.gguf_types import GGML_TYPES


def load_library() -> ctypes.CDLL:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "ggml_quants_lib.sh")], capture_output=True, text=True, check=True
    )
    return ctypes.CDLL(done.stdout.strip().splitlines()[-1])


def c_quantize(
    lib: ctypes.CDLL, type_name: str, m: np.ndarray, importance: np.ndarray | None, threads: int
) -> np.ndarray:
    """llama.cpp's bytes, rows shared among ``threads`` threads (ctypes releases the GIL)."""
    g = GGML_TYPES[type_name]
    rows, columns = m.shape
    out = np.zeros((rows, columns // g.block_size * g.block_bytes), np.uint8)
    fn = getattr(lib, "quantize_" + type_name.lower().replace("_k", "_K"))
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    weights = None if importance is None else importance.ctypes.data
    step = -(-rows // threads)

    def part(start: int) -> None:
        stop = min(rows, start + step)
        fn(m[start:].ctypes.data, out[start:].ctypes.data, stop - start, columns, weights)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, range(0, rows, step)))
    return out


def best_time(repeat: int, fn, *args) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--types", default=",".join(BLOCK_TYPES))
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lib = load_library()
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(args.size, args.size, generator=generator) * 0.02
    importance = torch.rand(args.size, generator=generator) ** 2
    m, imp = weight.numpy(), importance.numpy()
    rows = []
    print(f"{'type':8} {'path':8} {'lowbit s':>9} {'llama.cpp s':>12} {'ratio':>6}  bytes")
    for type_name in args.types.split(","):
        for label, weights in (("ref", None), ("imatrix", importance)):
            ours_s, ours = best_time(args.repeat, quantize_ggml, type_name, weight, weights)
            c_imp = None if weights is None else imp
            theirs_s, theirs = best_time(args.repeat, c_quantize, lib, type_name, m, c_imp, args.threads)
            equal = bool(np.array_equal(ours.numpy(), theirs))
            rows.append(
                {
                    "type": type_name,
                    "path": label,
                    "lowbit_s": round(ours_s, 3),
                    "llama_cpp_s": round(theirs_s, 3),
                    "ratio": round(ours_s / theirs_s, 2),
                    "bytes_equal": equal,
                }
            )
            print(
                f"{type_name:8} {label:8} {ours_s:9.2f} {theirs_s:12.2f} {ours_s / theirs_s:6.2f}  {'equal' if equal else 'DIFFER'}"
            )
    result = {
        "what": f"quantize a {args.size}x{args.size} float32 matrix (std 0.02) per GGUF block type",
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "load_average": os.getloadavg()},
        "torch": torch.__version__,
        "rows": rows,
    }
    out = ROOT / "bench" / "results" / f"gguf-blocks-cpu-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
