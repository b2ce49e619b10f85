"""quantize -> eval -> generate on a device (a CUDA GPU), for a tiny random model and for SmolLM2.

Everything goes through the public API with ``device=``: each scheme is quantized from the
model on disk (streamed, one layer at a time, worked on the device), evaluated on the device
against the float model (perplexity, KL, top-1 on token windows), and asked to continue a
prompt. Prints a table and writes JSON with the device, the date, torch's version, seconds
and peak device memory per step.

    python bench/device_run.py --device cuda --out results/           # tiny model only
    python bench/device_run.py --device cuda --gguf SmolLM2.gguf --data dev.txt --windows 40

The tiny model is a random Llama with a byte-level tokenizer (no download); SmolLM2 is the
embedded default's GGUF file, given by path on machines without the package.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import lowbit  # noqa: E402
from conftest import make_byte_tokenizer  # noqa: E402

SCHEMES = ("int8", "int4-g128", "int4-g128+clip", "nf4-dq")
PROMPT = "The river runs"


def tiny_model_dir(root: Path) -> Path:
    """A random Llama (hidden 256, 4 layers, byte vocabulary) saved with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.05)
    directory = root / "tiny-llama"
    model.save_pretrained(directory)
    make_byte_tokenizer().save_pretrained(directory)
    return directory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_and_reset(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def run_model(name: str, spec: str, device: torch.device, data: str | None, windows: int, length: int) -> list[dict]:
    rows = []
    reference = lowbit.load(spec)
    reference.to(device)
    peak_and_reset(device)
    start = time.perf_counter()
    result = lowbit.evaluate(reference, data=data, windows=windows, window_length=length, device=device, progress=False)
    synchronize(device)
    rows.append({"model": name, "scheme": "reference", **result, "eval_seconds": time.perf_counter() - start,
                 "peak_device_bytes": peak_and_reset(device)})  # fmt: skip
    for scheme in SCHEMES:
        start = time.perf_counter()
        quantized = lowbit.quantize(spec, scheme, device=device, progress=False)
        synchronize(device)
        quantize_seconds = time.perf_counter() - start
        quantize_peak = peak_and_reset(device)
        start = time.perf_counter()
        result = lowbit.evaluate(
            quantized, reference=reference, data=data, windows=windows, window_length=length, device=device, progress=False
        )
        synchronize(device)
        eval_seconds = time.perf_counter() - start
        eval_peak = peak_and_reset(device)
        tokens = 32
        start = time.perf_counter()
        text = lowbit.generate(quantized, PROMPT, max_new_tokens=tokens, chat=False, device=device)
        synchronize(device)
        generate_ms = 1000 * (time.perf_counter() - start) / tokens
        rows.append({
            "model": name, "scheme": scheme, **result, "quantize_seconds": quantize_seconds,
            "quantize_peak_device_bytes": quantize_peak, "eval_seconds": eval_seconds, "eval_peak_device_bytes": eval_peak,
            "generate_ms_per_token": generate_ms, "generated": text,
        })  # fmt: skip
        print(f"{name:<10} {scheme:<16} quantize {quantize_seconds:6.2f} s  KL {result['kl_divergence']:.5f}  "
              f"ppl {result['perplexity']:.3f}  top-1 {100 * result['top1_agreement']:.2f}%  "
              f"generate {generate_ms:.1f} ms/token  {text[:40]!r}", flush=True)  # fmt: skip
        del quantized
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gguf", help="SmolLM2's GGUF file (default: the installed default model, if any)")
    parser.add_argument("--data", help="evaluation text (default: lowbit's built-in sample)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-length", type=int, default=512)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--out", default="results", help="directory for the JSON")
    args = parser.parse_args()
    device = lowbit.device.resolve_device(args.device)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as root:
        if not args.skip_tiny:
            rows += run_model("tiny", str(tiny_model_dir(Path(root))), device, args.data, 8, 128)
        if args.gguf:
            rows += run_model("SmolLM2", args.gguf, device, args.data, args.windows, args.window_length)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "lowbit": lowbit.__version__,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"device-{device.type}-{report['date']}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
