"""Benchmark for the foundation: every preset on SmolLM2-135M under the dev protocol.

Dev protocol (../shared/data/README.md): the dev file tokenized once without BOS, its first
40 non-overlapping windows of 512 tokens, each evaluated on its own; KL(reference || model)
and top-1 agreement over every position against the unquantized model. Calibration (for the
``+clip`` rows): 128 windows of 512 tokens at random starts of the calib file, seed 0.

Peers measured in the same run: bitsandbytes' NF4 (with and without double quantization),
applied to the same linears through ``bitsandbytes.functional`` — the numerics lowbit's
``nf4`` promises to match. Prints a table and writes JSON (default results/foundation.json).

    python bench/foundation.py                      # everything, ~15 min on 2 cores
    python bench/foundation.py --schemes int8,nf4   # a subset
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.api import calibration_tokens, evaluation_windows
from lowbit.eval import bits_per_weight, evaluate_windows, reference_log_probs, weight_bytes
from lowbit.pipeline import quantize_model
from lowbit.plan import resolve_scheme
from lowbit.report import format_table

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCHEMES = (
    "bf16", "int8", "w8-g128", "fp8", "int4-g128", "int4-g128+clip", "int4-g64", "int4-g64+clip",
    "int4-sym-g128", "nf4", "nf4-dq", "mxfp4", "int3-g128", "int3-g128+clip", "int2-g64",
)  # fmt: skip


def bitsandbytes_rows(base, windows, reference) -> list[dict]:
    """The same linears quantized by bitsandbytes itself (dequantized for the CPU forward)."""
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        print("bitsandbytes is not installed: no peer rows")
        return []
    rows = []
    for double in (False, True):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        n_bytes = n_weights = 0
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                packed, state = bnb.quantize_4bit(module.weight.data, blocksize=64, quant_type="nf4", compress_statistics=double)
                module.weight.data = bnb.dequantize_4bit(packed, state).to(module.weight.dtype)
                n_weights += module.weight.numel()
                n_bytes += packed.numel() + (state.absmax.numel() * state.absmax.element_size())
                if double:
                    n_bytes += state.state2.absmax.numel() * 4 + 4
        seconds = time.perf_counter() - start
        row = {"scheme": f"bitsandbytes nf4{' dq' if double else ''}", "bits_per_weight": 8 * n_bytes / n_weights,
               "weight_bytes": None, "quantization_seconds": seconds}  # fmt: skip
        row.update(evaluate_windows(model, windows, reference, progress=False))
        row["tokens_per_second"] = None  # a dense model after dequantization: not comparable
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-length", type=int, default=512)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--json", default="results/foundation.json")
    args = parser.parse_args()
    if not (DATA / "wikitext2-valid-dev.txt").is_file():
        raise SystemExit(f"the dev data is not at {DATA}; this benchmark needs ../shared/data beside the repo")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)

    load_start = time.perf_counter()
    base = lowbit.load("smollm2-135m")
    tokenizer = base.lowbit_tokenizer
    print(f"loaded SmolLM2-135M in {time.perf_counter() - load_start:.1f} s")
    windows = evaluation_windows(tokenizer, DATA / "wikitext2-valid-dev.txt", args.windows, args.window_length)
    calibration = calibration_tokens(tokenizer, DATA / "wikitext2-valid-calib.txt", args.calibration_samples, args.window_length)
    reference = reference_log_probs(base, windows, progress=False)

    rows = [{"scheme": "reference (fp32)", "bits_per_weight": bits_per_weight(base), "weight_bytes": weight_bytes(base),
             "quantization_seconds": None, **evaluate_windows(base, windows, reference, progress=False)}]  # fmt: skip
    print(format_table(rows))
    for scheme in args.schemes.split(","):
        plan = resolve_scheme(scheme)
        uses_calibration = "+clip" in scheme
        model = copy.deepcopy(base)
        start = time.perf_counter()
        quantize_model(model, plan, calibration=calibration if uses_calibration else None, progress=False)
        seconds = time.perf_counter() - start
        row = {"scheme": scheme + (" (calibrated)" if uses_calibration else ""), "bits_per_weight": bits_per_weight(model),
               "weight_bytes": weight_bytes(model), "quantization_seconds": seconds}  # fmt: skip
        row.update(evaluate_windows(model, windows, reference, progress=False))
        rows.append(row)
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        del model
    if not args.no_peers:
        rows += bitsandbytes_rows(base, windows, reference)

    print(f"\nSmolLM2-135M, dev protocol: {windows.shape[0]} windows x {windows.shape[1]} tokens")
    print(format_table(rows))
    result = {
        "benchmark": "foundation",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
        "protocol": {"windows": int(windows.shape[0]), "window_length": int(windows.shape[1]), "bos": False,
                     "calibration_samples": args.calibration_samples, "calibration_seed": 0},  # fmt: skip
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "date": datetime.date.today().isoformat()},  # fmt: skip
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
