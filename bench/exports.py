"""Benchmark: SmolLM2-135M exported to compressed-tensors, GPTQ (v1, v2) and AWQ, and read back.

For each scheme (quantized once with RTN) and each target: the time of
``lowbit.export(model, OUT, to=TARGET)``, the output's size, the time of reading it back with
lowbit's own reader of that layout (``lowbit.load(OUT)``) and the largest logit difference
from the model that was exported (0 when the layout carries lowbit's values exactly), and the
time and logit difference of the target's own loader where it runs here: transformers'
compressed-tensors loader (symmetric pack-quantized; its asymmetric path is broken upstream,
llm-compressor issue 1618) and GPTQModel's torch backend when ``LOWBIT_GPTQMODEL_PYTHON`` names
a python that has it (its CUDA torch build is several GB: not a dependency). With ``--mlx``,
``bench/export_mlx.py``'s :func:`measure` adds the MLX row for each scheme.

``--big DIR`` also measures the bounded-memory claim: a bf16 Llama-shaped checkpoint of 1.1 B
random parameters (``bench/memory.py``'s, 2.2 GB, built under DIR first) exported with
``lowbit export DIR --to TARGET`` in its own process under ``/usr/bin/time -v`` (peak RSS and
wall time; quantized on the way, one decoder layer at a time, written one shard at a time).

    python bench/exports.py                                            # ~5 min on 2 idle cores
    python bench/exports.py --schemes int4-sym-g64 --targets gptq --windows 1     # a smoke run
    python bench/exports.py --big /tmp/lowbit-big --targets compressed-tensors,gptq

Records the load average (the development machine's 2 cores are shared); prints a table and
writes ``bench/results/exports-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.sources import token_windows, tokenize

DEV_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-valid-dev.txt"
TARGETS = "compressed-tensors,gptq,gptq-v2,awq"
GPTQMODEL_SCRIPT = """
import sys, time, torch
from gptqmodel import GPTQModel, BACKEND
start = time.perf_counter()
model = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
seconds = time.perf_counter() - start
with torch.no_grad():
    torch.save({"seconds": seconds, "logits": model(torch.load(sys.argv[2])).logits.float()}, sys.argv[3])
"""


def bench_module(name: str):
    """A sibling benchmark script as a module, loaded from its path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def max_difference(model: torch.nn.Module, windows: torch.Tensor, expected: list[torch.Tensor]) -> float:
    worst = 0.0
    for window, logits in zip(windows, expected):
        with torch.no_grad():
            worst = max(worst, float((model(window[None]).logits[0].float() - logits).abs().max()))
    return worst


def consumer(target: str, scheme: str, out: Path, windows: torch.Tensor, expected: list[torch.Tensor]) -> dict:
    """The target's own loader, where it runs here: ``{consumer, consumer_load_seconds, consumer_max_logit_difference}``."""
    if target == "compressed-tensors" and "-sym" in scheme:
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        loaded = AutoModelForCausalLM.from_pretrained(out)
        seconds = time.perf_counter() - start
        return {"consumer": "transformers", "consumer_load_seconds": round(seconds, 2),
                "consumer_max_logit_difference": max_difference(loaded, windows, expected)}  # fmt: skip
    python = os.environ.get("LOWBIT_GPTQMODEL_PYTHON")
    if target in ("gptq", "gptq-v2", "awq") and python:
        with tempfile.TemporaryDirectory() as scratch:
            torch.save(windows, Path(scratch) / "tokens.pt")
            run = subprocess.run([python, "-c", GPTQMODEL_SCRIPT, str(out), f"{scratch}/tokens.pt", f"{scratch}/out.pt"],
                                 capture_output=True, text=True, check=False)  # fmt: skip
            if run.returncode != 0:
                return {"consumer": "gptqmodel", "consumer_error": run.stderr.strip().splitlines()[-1]}
            result = torch.load(Path(scratch) / "out.pt")
        worst = max(float((got - logits).abs().max()) for got, logits in zip(result["logits"], expected))
        return {"consumer": "gptqmodel (float16)", "consumer_load_seconds": round(result["seconds"], 2), "consumer_max_logit_difference": worst}
    return {}


def measure(model: torch.nn.Module, tokenizer, target: str, scheme: str, out: Path, windows: torch.Tensor) -> dict:
    """Export ``model`` to ``target`` at ``out``, read it back with lowbit and with the target's loader."""
    expected = []
    for window in windows:
        with torch.no_grad():
            expected.append(model(window[None]).logits[0].float())
    start = time.perf_counter()
    lowbit.export(model, out, to=target, tokenizer=tokenizer)
    export_seconds = time.perf_counter() - start
    start = time.perf_counter()
    loaded = lowbit.load(out)
    load_seconds = time.perf_counter() - start
    row = {
        "target": target, "scheme": scheme, "export_seconds": round(export_seconds, 2), "output_mb": round(directory_bytes(out) / 1e6, 1),
        "lowbit_load_seconds": round(load_seconds, 2), "lowbit_max_logit_difference": max_difference(loaded, windows, expected),
    }  # fmt: skip
    row.update(consumer(target, scheme, out, windows, expected))
    return row


def big_rows(directory: Path, targets: list[str], scheme: str) -> list[dict]:
    memory = bench_module("memory")
    build_checkpoint, checkpoint_bytes, lowbit_command, peak_rss = memory.build_checkpoint, memory.checkpoint_bytes, memory.lowbit, memory.peak_rss
    if not directory.is_dir():
        print(f"building {directory} …", flush=True)
        build_checkpoint(directory)
    rows = []
    for target in targets:
        out = directory.parent / f"{directory.name}-{target}"
        shutil.rmtree(out, ignore_errors=True)
        rss, seconds, _ = peak_rss(lowbit_command("export", str(directory), "--to", target, "--scheme", scheme, "-o", str(out)))
        rows.append({"target": target, "scheme": scheme, "checkpoint_gb": round(checkpoint_bytes(directory) / 1e9, 2),
                     "export_seconds": round(seconds, 1), "peak_rss_gb": round(rss / 1e9, 2),
                     "peak_over_checkpoint": round(rss / checkpoint_bytes(directory), 2), "load_average": os.getloadavg()[0]})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--schemes", default="int4-g64,int4-sym-g64")
    parser.add_argument("--targets", default=TARGETS)
    parser.add_argument("--windows", type=int, default=2, help="dev windows of 512 tokens compared (default 2)")
    parser.add_argument("--mlx", action="store_true", help="also the MLX row of each scheme (bench/export_mlx.py)")
    parser.add_argument("--big", type=Path, help="also export a 2.2 GB random bf16 Llama checkpoint built here, under /usr/bin/time")
    parser.add_argument("--json", default=f"bench/results/exports-cpu-{datetime.date.today()}.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    targets = args.targets.split(",")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="lowbit-exports-bench-"))
    try:
        for scheme in args.schemes.split(","):
            model = lowbit.quantize(args.model, scheme, progress=False)
            tokenizer = model.lowbit_tokenizer
            windows = token_windows(tokenize(tokenizer, DEV_TEXT.read_text()), args.windows, 512)
            for target in targets:
                try:
                    row = measure(model, tokenizer, target, scheme, work / f"{scheme}-{target}", windows)
                except lowbit.LowbitError as refused:
                    row = {"target": target, "scheme": scheme, "refused": str(refused)}
                row["load_average"] = os.getloadavg()[0]
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.mlx:
                measure_mlx = bench_module("export_mlx").measure
                row = {"target": "mlx", "scheme": scheme, **measure_mlx(model, tokenizer, work / f"{scheme}-mlx", windows)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    big = big_rows(args.big, targets, "int4-g128") if args.big else []
    result = {"model": args.model, "date": str(datetime.date.today()), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "rows": rows, "big_checkpoint": big}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'scheme':<14}{'target':<20}{'export s':>9}{'MB':>7}{'load s':>8}{'lowbit dlogit':>14}  consumer")
    for r in rows:
        if "refused" in r:
            print(f"{r['scheme']:<14}{r['target']:<20}  refused: {r['refused']}")
            continue
        seen = r.get("consumer_max_logit_difference")
        their = f"{r['consumer']}: load {r['consumer_load_seconds']} s, dlogit {seen:.2e}" if seen is not None else r.get("consumer_error", "-")
        print(f"{r['scheme']:<14}{r['target']:<20}{r['export_seconds']:>9}{r['output_mb']:>7}{r.get('lowbit_load_seconds', r.get('mlx_load_seconds')):>8}"
              f"{r.get('lowbit_max_logit_difference', r.get('max_logit_difference', 0)):>14.2e}  {their}")  # fmt: skip
    for r in big:
        print(f"big {r['target']}: {r['checkpoint_gb']} GB bf16 -> export {r['export_seconds']} s, peak RSS {r['peak_rss_gb']} GB ({r['peak_over_checkpoint']}x)")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
