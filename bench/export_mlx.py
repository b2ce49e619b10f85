"""Benchmark: SmolLM2-135M exported to MLX, and what mlx-lm makes of it.

For each scheme: quantize (RTN) with lowbit, time ``lowbit.export(model, OUT, to="mlx")`` and
``mlx_lm.load(OUT)``, the output's size, and whether mlx-lm's model is lowbit's: the largest
logit difference and top-1 agreement over the first ``--windows`` windows of 512 tokens of the
dev text, and whether ``mlx_lm.stream_generate``'s greedy tokens for a prompt are lowbit's
``generate`` tokens; plus mlx-lm's own generation speed on the CPU (its ``generation_tps``).
Records the load average, because the development machine's 2 cores are shared. Prints a
table and writes JSON to ``bench/results/export-mlx-cpu-<date>.json``.

    python bench/export_mlx.py                                   # ~3 min on 2 idle cores
    python bench/export_mlx.py --schemes int4-g64 --windows 1    # a smoke run

:func:`measure` times one already-quantized model (for a benchmark of every export target).
Needs ``pip install "mlx-lm[cpu]"`` (the test extra) and, for the dev text, ``../shared/data``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import lowbit
from lowbit.sources import token_windows, tokenize

DEV_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-valid-dev.txt"
PROMPT = "The history of the river begins"
NEW_TOKENS = 32


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(model: torch.nn.Module, tokenizer, out: Path, windows: torch.Tensor) -> dict:
    """Export ``model`` (quantized by lowbit) to MLX at ``out``, load it with mlx-lm, and compare."""
    import mlx.core as mx
    import mlx_lm

    start = time.perf_counter()
    lowbit.export(model, out, to="mlx", tokenizer=tokenizer, overwrite=False)
    export_seconds = time.perf_counter() - start
    start = time.perf_counter()
    loaded, mlx_tokenizer = mlx_lm.load(str(out))
    load_seconds = time.perf_counter() - start
    worst, agree, positions = 0.0, 0, 0
    for window in windows:
        with torch.no_grad():
            expected = model(window[None]).logits[0].float().numpy()
        got = np.array(loaded(mx.array(window[None].numpy()))[0].astype(mx.float32))
        worst = max(worst, float(np.abs(got - expected).max()))
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        positions += len(window)
    prompt = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt) :].tolist()
    responses = list(mlx_lm.stream_generate(loaded, mlx_tokenizer, prompt, max_tokens=NEW_TOKENS))
    theirs = [r.token for r in responses]
    return {
        "export_seconds": round(export_seconds, 2),
        "mlx_load_seconds": round(load_seconds, 2),
        "output_mb": round(directory_bytes(out) / 1e6, 1),
        "max_logit_difference": worst,
        "top1_agreement": agree / positions,
        "positions": positions,
        "greedy_tokens_equal": theirs == ours[: len(theirs)],
        "greedy_tokens": len(theirs),
        "mlx_generation_tokens_per_second": round(responses[-1].generation_tps, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--schemes", default="int4-g64,int8-g32,mxfp4")
    parser.add_argument("--windows", type=int, default=4, help="dev windows of 512 tokens compared (default 4)")
    parser.add_argument("--json", default=f"bench/results/export-mlx-cpu-{datetime.date.today()}.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="lowbit-mlx-bench-"))
    try:
        for scheme in args.schemes.split(","):
            start = time.perf_counter()
            model = lowbit.quantize(args.model, scheme, progress=False)
            quantize_seconds = time.perf_counter() - start
            tokenizer = model.lowbit_tokenizer
            tokens = tokenize(tokenizer, DEV_TEXT.read_text())
            windows = token_windows(tokens, args.windows, 512)
            row = {"scheme": scheme, "quantize_seconds": round(quantize_seconds, 1)}
            row.update(measure(model, tokenizer, work / scheme, windows))
            row["load_average"] = os.getloadavg()[0]
            rows.append(row)
            print(json.dumps(row))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import mlx.core as mx
    import mlx_lm

    result = {
        "model": args.model, "date": str(datetime.date.today()), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "rows": rows,
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'scheme':<10}{'quantize s':>11}{'export s':>10}{'load s':>8}{'MB':>8}{'max |dlogit|':>14}{'top-1':>8}{'tokens':>8}{'tok/s':>8}")
    for r in rows:
        print(
            f"{r['scheme']:<10}{r['quantize_seconds']:>11}{r['export_seconds']:>10}{r['mlx_load_seconds']:>8}{r['output_mb']:>8}"
            f"{r['max_logit_difference']:>14.2e}{r['top1_agreement']:>8.4f}{'same' if r['greedy_tokens_equal'] else 'DIFFER':>8}"
            f"{r['mlx_generation_tokens_per_second']:>8}"
        )
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
