"""lowbit's GGUF files against llama-quantize's, on SmolLM2-135M under the dev protocol.

    python bench/gguf_llamacpp.py [--types Q8_0,Q6_K,...] [--windows 40] [--chunks 128] [--threads 2] [--work DIR]
    python bench/gguf_llamacpp.py --types Q4_K_M --windows 2 --chunks 4      # a smoke run (minutes)

Both sides start from the same F32 GGUF (``llama-quantize --allow-requantize SRC F32``: the
SmolLM2 GGUF's Q4_1 weights, unrounded). For each type, five files:

- ``llama``: ``llama-quantize F32 OUT TYPE``;
- ``llama+imatrix``: the same with ``--imatrix`` from ``llama-imatrix`` (``--chunks`` windows of
  512 tokens from the start of the calibration text, its default chunking);
- ``lowbit``: ``lowbit.export_gguf(F32, OUT, TYPE)``;
- ``lowbit+llama-imatrix``: the same with llama-imatrix's file;
- ``lowbit+imatrix``: with lowbit's own importance matrix (``lowbit.imatrix``, the same chunks).

Every file is loaded the same way (transformers' GGUF loader dequantizes it to float32) and
evaluated by lowbit's eval on the dev protocol (40 windows of 512 tokens of the dev text, no
BOS) against the F32 model: perplexity, KL and top-1 agreement. Also the file size and the
quantization time (llama-quantize with ``--threads`` threads; lowbit with as many torch
threads). llama.cpp's tools come from ``scripts/llama_cpp_tools.sh``. Prints a table and
writes ``bench/results/gguf-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# this file is named gguf.py: its folder must not shadow gguf-py's package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
DATA = ROOT.parent / "shared" / "data"
TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K", "IQ4_XS")
CONFIGS = ("llama", "llama+imatrix", "lowbit", "lowbit+llama-imatrix", "lowbit+imatrix")


def run(command: list[str]) -> float:
    """Run a tool; its wall seconds. Its output is kept for an error only."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def evaluate_file(path: Path, windows: torch.Tensor, reference) -> dict:
    from transformers import AutoModelForCausalLM

    from lowbit.eval import evaluate_windows

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    result = evaluate_windows(model, windows, reference, progress=False)
    return {key: result[key] for key in ("perplexity", "kl_divergence", "kl_divergence_se", "top1_agreement")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-length", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=128, help="calibration windows of 512 tokens for the importance matrices")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work", help="folder for the GGUF files (default: a temporary one)")
    parser.add_argument("--out", help="JSON file (default bench/results/gguf-cpu-<date>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="lowbit-bench-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LOWBIT_CACHE"] = str(work / "cache")  # dequantized sources stay out of the user's cache

    import lowbit
    from lowbit.api import evaluation_windows
    from lowbit.eval import reference_log_probs
    from lowbit.sources import default_model_path, load_tokenizer, resolve_model

    tools = Path(subprocess.run(["bash", str(ROOT / "scripts" / "llama_cpp_tools.sh")], capture_output=True, text=True, check=True).stdout.strip())
    dev, calib = DATA / "wikitext2-valid-dev.txt", DATA / "wikitext2-valid-calib.txt"
    f32 = work / "smollm2-F32.gguf"
    if not f32.is_file():
        run([str(tools / "llama-quantize"), "--allow-requantize", str(default_model_path()), str(f32), "F32"])
    results: dict = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "date": str(datetime.date.today()),
                     "windows": args.windows, "window_length": args.window_length, "chunks": args.chunks, "types": {}}  # fmt: skip

    configs = args.configs.split(",")
    imatrices = {}
    if any(c.endswith("imatrix") for c in configs):
        imatrices["llama"] = work / "llama.imatrix"
        seconds = run([str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(calib), "-c", "512", "--chunks", str(args.chunks),
                       "-t", str(args.threads), "-o", str(imatrices["llama"])])  # fmt: skip
        results["llama_imatrix_seconds"] = round(seconds, 2)
        imatrices["lowbit"] = work / "lowbit.imatrix"
        started = time.perf_counter()
        lowbit.imatrix(str(f32), calib, imatrices["lowbit"], calibration_samples=args.chunks, calibration_length=512, overwrite=True, progress=False)
        results["lowbit_imatrix_seconds"] = round(time.perf_counter() - started, 2)

    tokenizer = load_tokenizer(resolve_model(str(f32)))
    windows = evaluation_windows(tokenizer, dev, args.windows, args.window_length, bos=False)
    reference_model = lowbit.load(str(f32))
    reference = reference_log_probs(reference_model, windows, progress=False)

    for kind in args.types.split(","):
        row = results["types"][kind] = {}
        for config in configs:
            out = work / f"{kind}-{config}.gguf"
            out.unlink(missing_ok=True)
            if config.startswith("llama"):
                imatrix = ["--imatrix", str(imatrices["llama"])] if config == "llama+imatrix" else []
                seconds = run([str(tools / "llama-quantize"), *imatrix, str(f32), str(out), kind, str(args.threads)])
            else:
                file = {"lowbit+llama-imatrix": imatrices.get("llama"), "lowbit+imatrix": imatrices.get("lowbit")}.get(config)
                started = time.perf_counter()
                lowbit.export_gguf(str(f32), out, kind, imatrix_file=file, progress=False)
                seconds = time.perf_counter() - started
            row[config] = {"bytes": out.stat().st_size, "quantize_seconds": round(seconds, 2), **evaluate_file(out, windows, reference)}
            r = row[config]
            print(f"{kind:7s} {config:21s} {r['bytes'] / 1e6:8.2f} MB  ppl {r['perplexity']:8.3f}  KL {r['kl_divergence']:.5f}  "
                  f"top-1 {r['top1_agreement']:.4f}  {r['quantize_seconds']:6.1f} s", flush=True)  # fmt: skip
            out.unlink()

    path = Path(args.out or ROOT / "bench" / "results" / f"gguf-cpu-{results['date']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
