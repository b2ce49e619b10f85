"""QLoRA and transformers loading on the CPU: lowbit (through transformers and peft) against
bitsandbytes NF4, on the same model and batch.

    python bench/qlora.py [--model DIR] [--scheme nf4-dq] [--batch 4 --length 256 --steps 3]
    python bench/qlora.py --big          # also a Llama-shaped random bf16 checkpoint of 1.1 B parameters
    python bench/qlora.py --smoke        # a tiny random model, one step: checks the script runs

Every case runs in a fresh process and reports its peak RSS (``ru_maxrss``: every page the
process ever held at once, the Python runtime and libraries included), after a load the
resident memory split into anonymous and file-backed pages (transformers memory-maps the
checkpoint: the pages it read count in RSS until the file is closed, though the kernel may
drop them), and its times:

- ``baseline``: importing torch, transformers, peft and lowbit, nothing loaded;
- ``load-lowbit``: ``from_pretrained(MODEL, quantization_config=LowbitConfig(scheme))``,
  quantized while it loads (one weight at a time) vs ``load-bnb``: ``BitsAndBytesConfig``
  NF4 with double quantization (bitsandbytes runs NF4 on the CPU), compute dtype float32;
- ``qlora-lowbit`` / ``qlora-bnb``: the same load, ``prepare_model_for_kbit_training``
  (gradient checkpointing on), LoRA r=16 on every decoder linear, then ``--steps`` AdamW steps
  on a ``--batch`` x ``--length`` batch of token ids: peak RSS and seconds per step;
- ``generate-lowbit``: ``from_pretrained`` of a lowbit checkpoint (written first by
  ``lowbit quantize``) and 32 greedy tokens: load seconds and ms per token.

MODEL defaults to the embedded SmolLM2-135M (lowbit's cached float32 directory of its GGUF).
Prints a table and writes ``bench/results/qlora-cpu-<date>.json``. The lead runs the full
numbers; ``--smoke`` is the CI-sized check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = ("baseline", "load-lowbit", "load-bnb", "qlora-lowbit", "qlora-bnb", "generate-lowbit")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _resident_mb() -> dict:
    """Resident memory now, split: anonymous (the process's own) and file-backed (pages of
    memory-mapped checkpoints, which the kernel can drop)"""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {f"{key.lower()}_mb": int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile") if key in fields}


def _load(model_dir: str, kind: str, scheme: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import lowbit

    if kind == "bnb":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
        )
    else:
        config = lowbit.LowbitConfig(scheme=scheme)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32)


def run_case(case: str, model_dir: str, scheme: str, batch: int, length: int, steps: int) -> dict:
    """One case in this process (see the module docstring); returns its measurements."""
    import torch
    import transformers  # noqa: F401
    import peft  # noqa: F401

    import lowbit  # noqa: F401

    torch.manual_seed(0)
    result: dict = {"case": case}
    if case == "baseline":
        pass
    elif case.startswith(("load-", "qlora-")):
        kind = case.split("-")[1]
        start = time.perf_counter()
        model = _load(model_dir, kind, scheme)
        result["load_s"] = time.perf_counter() - start
        result["footprint_mb"] = model.get_memory_footprint() / 1e6
        result["peak_after_load_mb"] = _peak_mb()
        result.update(_resident_mb())
        if case.startswith("qlora-"):
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

            from lowbit.integrations.peft import register

            model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
            config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
            model = get_peft_model(model, register(config) if kind == "lowbit" else config)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            tokens = torch.randint(0, model.config.vocab_size, (batch, length))
            model.train()
            losses, times = [], []
            for _ in range(steps):
                start = time.perf_counter()
                loss = model(input_ids=tokens, labels=tokens).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                times.append(time.perf_counter() - start)
                losses.append(loss.item())
            result.update(step_s=min(times), losses=losses, batch=batch, length=length)
    elif case == "generate-lowbit":
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        result["load_s"] = time.perf_counter() - start
        prompt = torch.randint(0, model.config.vocab_size, (1, 16))
        model.generate(prompt, max_new_tokens=2, do_sample=False)  # warm up
        start = time.perf_counter()
        new = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False).shape[1] - 16
        result["ms_per_token"] = 1000 * (time.perf_counter() - start) / new
    else:
        raise SystemExit(f"unknown case {case!r}")
    result["peak_rss_mb"] = _peak_mb()
    return result


def _child(case: str, model_dir: str, args) -> dict:
    command = [sys.executable, __file__, "--case", case, "--model", model_dir, "--scheme", args.scheme,
               "--batch", str(args.batch), "--length", str(args.length), "--steps", str(args.steps)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        return {"case": case, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _models(args, work: Path) -> dict[str, str]:
    """Name -> float model directory to measure."""
    if args.smoke:
        from tiny_models import tiny_model

        directory = work / "tiny"
        tiny_model("llama").save_pretrained(directory)
        return {"tiny random llama": str(directory)}
    if args.model:
        models = {Path(args.model).name: args.model}
    else:
        from lowbit.gguf_cache import entry_directory
        from lowbit.sources import default_model_path

        import lowbit

        lowbit.load("smollm2-135m")  # makes sure the cached directory exists
        models = {"SmolLM2-135M (float32 from its GGUF)": str(entry_directory(default_model_path()))}
    if args.big:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
        memory = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(memory)
        directory = work / "llama-1.1b-bf16"
        memory.build_checkpoint(directory)
        models["random Llama 1.1 B (bf16, 2.2 GB)"] = str(directory)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a float HF model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--scheme", default="nf4-dq", help="lowbit scheme to compare with bitsandbytes NF4 (default nf4-dq)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per training step (default 4)")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--steps", type=int, default=3, help="training steps; the fastest is reported (default 3)")
    parser.add_argument("--big", action="store_true", help="also measure loading a 1.1 B random bf16 Llama (built under a temporary directory)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, one short step: checks that every case runs")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.model, args.scheme, args.batch, args.length, args.steps)))
        return
    if args.smoke:
        args.batch, args.length, args.steps = 2, 32, 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-qlora-") as work:
        work = Path(work)
        for name, directory in _models(args, work).items():
            out = work / "lowbit-out"
            subprocess.run([sys.executable, "-m", "lowbit", "quantize", directory, "--scheme", args.scheme, "-o", str(out), "--overwrite"],
                           check=True, capture_output=True)  # fmt: skip
            cases = CASES if not name.startswith("random Llama") else ("baseline", "load-lowbit", "load-bnb")
            for case in cases:
                row = _child(case, str(out) if case == "generate-lowbit" else directory, args)
                row["model"] = name
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    print(f"\n| model | case | peak RSS MB | anon / file MB after load | load s | footprint MB | s/step | ms/token |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "rssanon_mb" in row:
            row["resident"] = f"{row['rssanon_mb']:,.0f} / {row.get('rssfile_mb', 0):,.0f}"
        cells = [row.get(key) for key in ("peak_rss_mb", "resident", "load_s", "footprint_mb", "step_s", "ms_per_token")]
        text = " | ".join("" if v is None else f"{v:,.1f}" if isinstance(v, float) else str(v) for v in cells)
        print(f"| {row['model']} | {row['case']}{' (' + row['error'] + ')' if 'error' in row else ''} | {text} |")
    if not args.smoke:
        date = datetime.date.today().isoformat()
        path = ROOT / "bench" / "results" / f"qlora-cpu-{date}.json"
        meta = {"date": date, "machine": platform.platform(), "cpus": os.cpu_count(), "scheme": args.scheme,
                "batch": args.batch, "length": args.length, "steps": args.steps, "load_average": os.getloadavg()}  # fmt: skip
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
