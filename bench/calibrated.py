"""AWQ, SmoothQuant and FP8 W8A8 against RTN and llm-compressor's AWQ on SmolLM2-135M, same run.

Dev protocol of ../shared/data/README.md: 40 windows of 512 tokens of the dev file, KL to the
float model, perplexity and top-1 agreement; calibration: windows of 512 tokens at random
starts of the calib file, seed 0 (``lowbit.api.calibration_tokens``), the same token ids for
both tools. llm-compressor's AWQ runs in its own virtual environment (``bench/peers.py``'s
``ensure_venv``) through ``peer_llmcompressor_awq_worker.py`` (``IntermediatesCache.pin_memory``
patched to a no-op: it pins memory, which fails without a GPU) and is evaluated by
``bench/gptq.py``'s ``peer_row``. llm-compressor refuses group sizes that do not divide a row
(SmolLM2's rows are 576 wide), so its row is group 64, beside lowbit's AWQ at group 64 and 128.
llm-compressor's AWQ took about 8 minutes at 32 x 512 on 2 cores, and would take about half an
hour at 128 x 512: the default here is 32 calibration samples for both tools (``--calibration-samples``).

The W8A8 rows quantize activations per token in evaluation too (``QuantLinear.input_quantizer``),
so their perplexity is what a W8A8 kernel computes; ``perplexity_vs_float`` is the ratio to the
float model's (the target: within 1%). Every preset keeps ``lm_head`` in full precision.

    python bench/calibrated.py             # writes bench/results/calibrated-cpu-<date>.json
    python bench/calibrated.py --no-peers --rows "AWQ int4-g128,RTN int4-g128+clip" --windows 8 --calibration-samples 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import warnings
from pathlib import Path

import torch
from gptq import DATA, load_average, lowbit_row, peer_row
from peers import ensure_venv
from safetensors.torch import save_file

import lowbit
from lowbit.algorithms import SmoothQuantConfig
from lowbit.api import calibration_tokens, evaluation_windows
from lowbit.eval import evaluate_windows, reference_log_probs
from lowbit.plan import Plan, make_rule, resolve_scheme
from lowbit.report import format_table

AWQ_WORKER = Path(__file__).with_name("peer_llmcompressor_awq_worker.py")


def awq(fmt: str, **options) -> Plan:
    return Plan([make_rule("lm_head", "keep"), make_rule("*", {"format": fmt, "method": "awq", **options})], f"{fmt} awq")


#: label -> lowbit plan (None: llm-compressor's AWQ, bits and group from PEERS), in run order
ROWS = {
    "RTN int4-g128": lambda: resolve_scheme("int4-g128"),
    "RTN int4-g128+clip": lambda: resolve_scheme("int4-g128+clip"),
    "AWQ int4-g128": lambda: awq("int4-g128"),
    "W8A8 RTN": lambda: resolve_scheme("w8a8"),
    "W8A8 SmoothQuant": lambda: resolve_scheme("w8a8", "smoothquant"),
    "W8A8 SmoothQuant norms only": lambda: resolve_scheme("w8a8", SmoothQuantConfig(smooth_linears=False)),
    "W8A8-FP8 RTN": lambda: resolve_scheme("w8a8-fp8"),
    "W8A8-FP8 SmoothQuant": lambda: resolve_scheme("w8a8-fp8", "smoothquant"),
    "W8A8-FP8 SmoothQuant norms only": lambda: resolve_scheme("w8a8-fp8", SmoothQuantConfig(smooth_linears=False)),
    "RTN int4-g64+clip": lambda: resolve_scheme("int4-g64+clip"),
    "AWQ int4-g64": lambda: awq("int4-g64"),
    "llm-compressor AWQ W4A16_ASYM g64": None,
    "AWQ int4-g128 not sequential": lambda: awq("int4-g128", sequential=False),
}
PEERS = {"llm-compressor AWQ W4A16_ASYM g64": (4, 64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row labels, run in this order")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-length", type=int, default=512)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--calibration-length", type=int, default=512)
    parser.add_argument("--no-peers", action="store_true")
    today = datetime.date.today().isoformat()
    parser.add_argument("--json", default=str(Path(__file__).with_name("results") / f"calibrated-cpu-{today}.json"))
    args = parser.parse_args()
    labels = [label.strip() for label in args.rows.split(",")]
    unknown = [label for label in labels if label not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows are: {', '.join(ROWS)}")
    if args.no_peers:
        labels = [label for label in labels if label not in PEERS]
    if not (DATA / "wikitext2-valid-dev.txt").is_file():
        raise SystemExit(f"the dev data is not at {DATA}; this benchmark needs ../shared/data beside the repo")
    warnings.simplefilter("ignore")
    python = ensure_venv() if any(label in PEERS for label in labels) else None

    base = lowbit.load("smollm2-135m")
    tokenizer = base.lowbit_tokenizer
    windows = evaluation_windows(tokenizer, DATA / "wikitext2-valid-dev.txt", args.windows, args.window_length)
    calibration = calibration_tokens(
        tokenizer, DATA / "wikitext2-valid-calib.txt", args.calibration_samples, args.calibration_length, seed=0
    )
    reference = reference_log_probs(base, windows, progress=False)
    float_row = {"scheme": "float (reference)", "load_average_before": load_average(),
                 **evaluate_windows(base, windows, reference, progress=False)}  # fmt: skip
    result = {
        "benchmark": "calibrated", "date": today, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "protocol": {"windows": list(windows.shape), "calibration": list(calibration.shape), "calibration_seed": 0},
        "rows": [float_row],
    }  # fmt: skip
    print(format_table([float_row]), flush=True)
    with tempfile.TemporaryDirectory() as work:
        if python is not None:
            base.save_pretrained(f"{work}/float", safe_serialization=True)
            tokenizer.save_pretrained(f"{work}/float")
            save_file({"input_ids": calibration.contiguous()}, f"{work}/calibration.safetensors")
        for label in labels:
            if label in PEERS:
                row = peer_row(label, python, work, base, windows, reference, AWQ_WORKER, PEERS[label])
            else:
                row = lowbit_row(label, ROWS[label](), base, calibration, windows, reference)
            if "error" not in row:
                row["perplexity_vs_float"] = row["perplexity"] / float_row["perplexity"]
            result["rows"].append(row)
            print(format_table([row]) if "error" not in row else f"{label}: {row['error']}", flush=True)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nSmolLM2-135M, dev protocol: {windows.shape[0]} windows x {windows.shape[1]} tokens; "
          f"calibration {calibration.shape[0]} x {calibration.shape[1]} (both tools)")  # fmt: skip
    print(format_table([row for row in result["rows"] if "error" not in row]))
    for row in result["rows"]:
        if "perplexity_vs_float" in row:
            print(f"{row['scheme']:<36} perplexity / float = {row['perplexity_vs_float']:.4f}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
