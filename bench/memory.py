"""Peak memory of lowbit's main commands, as the operating system measures it.

    python bench/memory.py [--work DIR] [--keep]

Runs each command in its own process under ``/usr/bin/time -v`` and reads "Maximum resident
set size" (peak RSS: every page the process ever had in RAM at once, the Python runtime and
libraries included):

(a) ``lowbit quantize DIR --scheme int4-g128`` on a bf16 Llama-shaped checkpoint of 1.1 B
    random parameters (hidden 2048, intermediate 5632, 22 layers, vocabulary 32000, lm_head
    untied: TinyLlama's shape, about 2.2 GB in two shards) with a byte-level tokenizer,
    built under ``--work`` first; the target is a peak below 0.7x the checkpoint, which the
    pipeline reaches by loading one decoder layer at a time (``model.lowbit_weights``);
(b) ``lowbit quantize smollm2-135m --scheme int4-g128`` (the float32 SmolLM2 from lowbit's
    GGUF cache; one untimed run first warms the cache);
(c) ``lowbit compare smollm2-135m`` with the 8 default schemes on 8 windows of 512 tokens.

Prints a table (peak RSS, and its ratio to the float checkpoint's bytes on disk) and writes
``bench/results/memory-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_byte_tokenizer  # noqa: E402  (the test suite's offline tokenizer)

#: TinyLlama-1.1B's shape, untied: 1.1 B parameters, 2.2 GB in bfloat16
LLAMA_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
SHARD_BYTES = 1_200_000_000
SCHEMES = "int8,int4-g128,int4-g128+clip,nf4,nf4-dq,int3-g128,fp8,mxfp4"
TARGET_RATIO = 0.7


def build_checkpoint(directory: Path) -> None:
    """A bf16 Llama checkpoint with random weights (normal, std 0.02; norms 1), generated and
    written one shard at a time."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA_SHAPE, dtype="bfloat16")
    with init_empty_weights():
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).state_dict().items()}
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        if plan[-1] and size + shape.numel() * 2 > SHARD_BYTES:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += shape.numel() * 2
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, names in enumerate(plan, 1):
        tensors = {
            name: torch.ones(shapes[name], dtype=torch.bfloat16)
            if len(shapes[name]) == 1
            else (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
            for name in names
        }
        file = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
        save_file(tensors, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(s.numel() * 2 for s in shapes.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(directory)
    make_byte_tokenizer().save_pretrained(directory)


def checkpoint_bytes(directory: Path) -> int:
    return sum(file.stat().st_size for file in directory.glob("*.safetensors"))


def peak_rss(command: list[str]) -> tuple[int, float, str]:
    """``(peak RSS in bytes, seconds, last lines of output)`` of ``command`` in its own process."""
    start = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    output = run.stdout + run.stderr
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({run.returncode}):\n{output[-3000:]}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", output)
    return int(found.group(1)) * 1024, seconds, "\n".join(output.splitlines()[-25:])


def lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit", *args]


def smollm_checkpoint_bytes() -> int:
    from lowbit.gguf_cache import entry_directory
    from lowbit.sources import default_model_path

    return checkpoint_bytes(entry_directory(default_model_path()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="where to build the checkpoint and outputs (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lowbit-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        llama = work / "llama-1.2b-bf16"
        if not llama.is_dir():
            print(f"building {llama} …", flush=True)
            build_checkpoint(llama)
        size = checkpoint_bytes(llama)
        peak, seconds, _ = peak_rss(lowbit("quantize", str(llama), "--scheme", "int4-g128", "-o", str(work / "llama-int4"), "--overwrite"))
        rows.append({"run": "quantize llama-1.2b-bf16 int4-g128", "checkpoint_bytes": size, "peak_rss_bytes": peak, "seconds": seconds, "target_ratio": TARGET_RATIO})

        subprocess.run(lowbit("quantize", "smollm2-135m", "--scheme", "int8", "-o", str(work / "warm"), "--overwrite"), cwd=ROOT, check=True, capture_output=True)
        size = smollm_checkpoint_bytes()
        peak, seconds, _ = peak_rss(lowbit("quantize", "smollm2-135m", "--scheme", "int4-g128", "-o", str(work / "smollm-int4"), "--overwrite"))
        rows.append({"run": "quantize smollm2-135m (fp32) int4-g128", "checkpoint_bytes": size, "peak_rss_bytes": peak, "seconds": seconds})

        peak, seconds, _ = peak_rss(lowbit("compare", "smollm2-135m", "--schemes", SCHEMES, "--windows", "8", "--json", str(work / "compare.json")))
        rows.append({"run": "compare smollm2-135m, 8 schemes, 8 windows", "checkpoint_bytes": size, "peak_rss_bytes": peak, "seconds": seconds})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row["ratio"] = row["peak_rss_bytes"] / row["checkpoint_bytes"]
    print(f"\n{'run':<48} {'checkpoint':>11} {'peak RSS':>10} {'ratio':>6} {'s':>7}")
    for row in rows:
        target = f"  (target <= {row['target_ratio']})" if "target_ratio" in row else ""
        print(
            f"{row['run']:<48} {row['checkpoint_bytes'] / 1e9:>9.2f} GB {row['peak_rss_bytes'] / 1e9:>7.2f} GB "
            f"{row['ratio']:>6.2f} {row['seconds']:>7.1f}{target}"
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    today = datetime.date.today().isoformat()
    result = {
        "date": today, "commit": commit, "torch": torch.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "measured_by": "/usr/bin/time -v, Maximum resident set size", "rows": rows,
    }  # fmt: skip
    out = ROOT / "bench" / "results" / f"memory-cpu-{today}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
