"""lowbit against llm-compressor's round-to-nearest on SmolLM2-135M, same run, same machine.

llm-compressor is installed by this script into its own virtual environment
(``.venv-peers/llmcompressor``: torch 2.13.0 and llmcompressor 0.14.0.1), where
``peer_llmcompressor_worker.py`` quantizes the float model data-free and returns the
dequantized weights; both are then evaluated here with the dev protocol of
``bench/foundation.py`` against the same reference. llm-compressor refuses group sizes that
do not divide a row (SmolLM2's rows are 576 wide), so INT4 is compared at group 64.

    python bench/peers.py            # writes results/peers.json
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

import lowbit
from lowbit.api import evaluation_windows
from lowbit.eval import bits_per_weight, evaluate_windows, reference_log_probs, weight_bytes
from lowbit.pipeline import quantize_model
from lowbit.plan import resolve_scheme
from lowbit.report import format_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
VENV = ROOT / ".venv-peers" / "llmcompressor"
WORKER = Path(__file__).with_name("peer_llmcompressor_worker.py")
#: (lowbit scheme, llm-compressor bits, group size (0 = per channel), symmetric)
PAIRS = (("int4-g64", 4, 64, False), ("int8", 8, 0, True))


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"installing llm-compressor into {VENV} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build, not the CUDA stack
        subprocess.run([*pip, "llmcompressor==0.14.0.1"], check=True)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-length", type=int, default=512)
    parser.add_argument("--json", default="results/peers.json")
    args = parser.parse_args()
    if not (DATA / "wikitext2-valid-dev.txt").is_file():
        raise SystemExit(f"the dev data is not at {DATA}; this benchmark needs ../shared/data beside the repo")
    warnings.simplefilter("ignore")
    python = ensure_venv()
    base = lowbit.load("smollm2-135m")
    windows = evaluation_windows(base.lowbit_tokenizer, DATA / "wikitext2-valid-dev.txt", args.windows, args.window_length)
    reference = reference_log_probs(base, windows, progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        base.save_pretrained(work + "/float", safe_serialization=True)
        for scheme, bits, group_size, symmetric in PAIRS:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            quantize_model(model, resolve_scheme(scheme), progress=False)
            row = {"scheme": f"lowbit {scheme}", "bits_per_weight": bits_per_weight(model), "weight_bytes": weight_bytes(model),
                   "quantization_seconds": time.perf_counter() - start}  # fmt: skip
            rows.append({**row, **evaluate_windows(model, windows, reference, progress=False)})

            out = f"{work}/peer-{scheme}.safetensors"
            command = [str(python), str(WORKER), work + "/float", out, str(bits), str(group_size), "1" if symmetric else "0"]
            report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            peer = copy.deepcopy(base)
            with torch.no_grad():
                for name, weight in load_file(out).items():
                    peer.get_parameter(name).copy_(weight)
            row = {"scheme": f"llm-compressor {scheme}", "bits_per_weight": None, "weight_bytes": None,
                   "quantization_seconds": report["seconds"]}  # fmt: skip
            row.update(evaluate_windows(peer, windows, reference, progress=False))
            row["tokens_per_second"] = None  # a dense model with fake-quantized weights: not comparable
            rows.append(row)
            print(format_table(rows[-2:]), flush=True)
    print(f"\nSmolLM2-135M, dev protocol: {windows.shape[0]} windows x {windows.shape[1]} tokens")
    print(format_table(rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"benchmark": "peers", "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
