"""GPTQ against RTN and llm-compressor's GPTQ on SmolLM2-135M, same run, same calibration ids.

Dev protocol of ../shared/data/README.md: 40 windows of 512 tokens of the dev file, KL to the
float model, perplexity and top-1 agreement; calibration: 128 windows of 512 tokens at random
starts of the calib file, seed 0 (``lowbit.api.calibration_tokens``). The same token ids go to
llm-compressor, which runs in its own virtual environment (``bench/peers.py``'s
``ensure_venv``) through ``peer_llmcompressor_gptq_worker.py`` with its defaults (activation
ordering "static", dampening 0.01, block 128). llm-compressor refuses group sizes that do not
divide a row (SmolLM2's rows are 576 wide), so its rows are group 64. Every preset keeps
``lm_head`` in full precision, as llm-compressor's recipe ignores it.

Rows are written to the JSON file as they finish (a long run can be read before it ends).

    python bench/gptq.py                 # ~1 h on 2 cores; writes bench/results/gptq-cpu-<date>.json
    python bench/gptq.py --no-peers --rows "GPTQ int4-g128"
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.api import calibration_tokens, evaluation_windows
from lowbit.eval import bits_per_weight, evaluate_windows, reference_log_probs, weight_bytes
from lowbit.pipeline import quantize_model
from lowbit.plan import Plan, make_rule, resolve_scheme
from lowbit.report import format_table
from peers import ensure_venv

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORKER = Path(__file__).with_name("peer_llmcompressor_gptq_worker.py")


def gptq(fmt: str, **options) -> Plan:
    return Plan([make_rule("lm_head", "keep"), make_rule("*", {"format": fmt, "algorithm": "gptq", **options})], f"{fmt} gptq")


#: label -> lowbit plan (None: an llm-compressor row, bits and group from PEERS), in run order
#: (the issue's targets first)
ROWS = {
    "RTN int4-g128": lambda: resolve_scheme("int4-g128"),
    "RTN int4-g64": lambda: resolve_scheme("int4-g64"),
    "GPTQ int4-g128": lambda: gptq("int4-g128"),
    "GPTQ int4-g64": lambda: gptq("int4-g64"),
    "llm-compressor GPTQ W4A16_ASYM g64": None,
    "RTN int4-g128+clip": lambda: resolve_scheme("int4-g128+clip"),
    "GPTQ int3-g64": lambda: gptq("int3-g64"),
    "GPTQ int2-g64": lambda: gptq("int2-g64"),
    "RTN int3-g64": lambda: resolve_scheme("int3-g64"),
    "RTN int2-g64": lambda: resolve_scheme("int2-g64"),
    "llm-compressor GPTQ W3A16_ASYM g64": None,
    "llm-compressor GPTQ W2A16_ASYM g64": None,
    "GPTQ int2-g64 act_order": lambda: gptq("int2-g64", act_order=True),
    "GPTQ int4-g64 act_order": lambda: gptq("int4-g64", act_order=True),
}
PEERS = {
    "llm-compressor GPTQ W4A16_ASYM g64": (4, 64),
    "llm-compressor GPTQ W3A16_ASYM g64": (3, 64),
    "llm-compressor GPTQ W2A16_ASYM g64": (2, 64),
}


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def lowbit_row(label, plan, base, calibration, windows, reference) -> dict:
    model = copy.deepcopy(base)
    load = load_average()
    start = time.perf_counter()
    quantize_model(model, plan, calibration=calibration, device="cpu", progress=False)
    row = {"scheme": label, "bits_per_weight": bits_per_weight(model), "weight_bytes": weight_bytes(model),
           "quantization_seconds": time.perf_counter() - start, "load_average_before": load}  # fmt: skip
    return {**row, **evaluate_windows(model, windows, reference, progress=False)}


def peer_row(label, python, work, base, windows, reference, worker: Path = WORKER, setting: tuple[int, int] | None = None) -> dict:
    """Run an llm-compressor ``worker`` (``MODEL_DIR CALIBRATION OUT BITS GROUP_SIZE``; default the
    GPTQ one, ``setting`` default ``PEERS[label]``) and evaluate the weights it writes in a copy of ``base``."""
    bits, group_size = setting or PEERS[label]
    out = f"{work}/peer-{bits}.safetensors"
    load = load_average()
    command = [str(python), str(worker), f"{work}/float", f"{work}/calibration.safetensors", out, str(bits), str(group_size)]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        return {"scheme": label, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    report = json.loads(done.stdout.splitlines()[-1])
    peer = copy.deepcopy(base)
    with torch.no_grad():
        for name, weight in load_file(out).items():
            peer.get_parameter(name).copy_(weight)
    row = {"scheme": label, "bits_per_weight": None, "weight_bytes": None, "quantization_seconds": report["seconds"],
           "load_average_before": load}  # fmt: skip
    row.update(evaluate_windows(peer, windows, reference, progress=False))
    row["tokens_per_second"] = None  # a dense model with fake-quantized weights: not comparable
    return row


def protocol_arguments(description: str, rows: dict, peers: dict, samples: int, name: str) -> tuple[argparse.Namespace, list[str]]:
    """The options every dev-protocol benchmark takes, and the row labels to run (checked
    against ``rows``; ``--no-peers`` drops those of ``peers``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(rows), help="comma-separated row labels, run in this order")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-length", type=int, default=512)
    parser.add_argument("--calibration-samples", type=int, default=samples)
    parser.add_argument("--calibration-length", type=int, default=512)
    parser.add_argument("--no-peers", action="store_true")
    today = datetime.date.today().isoformat()
    parser.add_argument("--json", default=str(Path(__file__).with_name("results") / f"{name}-cpu-{today}.json"))
    args = parser.parse_args()
    labels = [label.strip() for label in args.rows.split(",")]
    unknown = [label for label in labels if label not in rows]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows are: {', '.join(rows)}")
    if args.no_peers:
        labels = [label for label in labels if label not in peers]
    if not (DATA / "wikitext2-valid-dev.txt").is_file():
        raise SystemExit(f"the dev data is not at {DATA}; this benchmark needs ../shared/data beside the repo")
    warnings.simplefilter("ignore")
    return args, labels


class DevProtocol:
    """SmolLM2-135M on the dev protocol: the float model, its evaluation windows, the
    calibration ids every tool gets, and the reference summary."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.base = lowbit.load("smollm2-135m")
        self.tokenizer = self.base.lowbit_tokenizer
        self.windows = evaluation_windows(self.tokenizer, DATA / "wikitext2-valid-dev.txt", args.windows, args.window_length)
        self.calibration = calibration_tokens(
            self.tokenizer, DATA / "wikitext2-valid-calib.txt", args.calibration_samples, args.calibration_length, seed=0
        )
        self.reference = reference_log_probs(self.base, self.windows, progress=False)

    def result(self, benchmark: str, rows: list[dict]) -> dict:
        return {
            "benchmark": benchmark, "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "protocol": {"windows": list(self.windows.shape), "calibration": list(self.calibration.shape), "calibration_seed": 0},
            "rows": rows,
        }  # fmt: skip

    def run(self, labels: list[str], rows: dict, peers: dict, worker: Path, result: dict, json_path: str, finish=None) -> None:
        """Run each row (lowbit's plan, or the llm-compressor ``worker`` for a label in ``peers``),
        ``finish(row)`` it, print it and write ``result`` to ``json_path`` after every row."""
        python = ensure_venv() if any(label in peers for label in labels) else None
        with tempfile.TemporaryDirectory() as work:
            if python is not None:
                self.base.save_pretrained(f"{work}/float", safe_serialization=True)
                self.tokenizer.save_pretrained(f"{work}/float")
                save_file({"input_ids": self.calibration.contiguous()}, f"{work}/calibration.safetensors")
            for label in labels:
                if label in peers:
                    row = peer_row(label, python, work, self.base, self.windows, self.reference, worker, peers[label])
                else:
                    row = lowbit_row(label, rows[label](), self.base, self.calibration, self.windows, self.reference)
                if finish is not None and "error" not in row:
                    finish(row)
                result["rows"].append(row)
                print(format_table([row]) if "error" not in row else f"{label}: {row['error']}", flush=True)
                Path(json_path).parent.mkdir(parents=True, exist_ok=True)
                Path(json_path).write_text(json.dumps(result, indent=2) + "\n")

    def summary(self, result: dict, json_path: str) -> None:
        print(f"\nSmolLM2-135M, dev protocol: {self.windows.shape[0]} windows x {self.windows.shape[1]} tokens; "
              f"calibration {self.calibration.shape[0]} x {self.calibration.shape[1]} (every tool)")  # fmt: skip
        print(format_table([row for row in result["rows"] if "error" not in row]))
        print(f"wrote {json_path}")


def main() -> None:
    args, labels = protocol_arguments(__doc__, ROWS, PEERS, 128, "gptq")
    protocol = DevProtocol(args)
    result = protocol.result("gptq", [])
    protocol.run(labels, ROWS, PEERS, WORKER, result, args.json)
    protocol.summary(result, args.json)


if __name__ == "__main__":
    main()
