"""Benchmark: greedy generation on the CPU, float vs quantized, with and without the dense cache.

A quantized layer's forward dequantizes its weight on every call by default; in small-batch
generation that costs as much as the multiply itself, for every weight and every token.
``lowbit.nn.dense_cache`` dequantizes each layer once for the duration of a generation. This
measures what that buys, and what it costs in memory.

Model: a random Llama with SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads / 3 KV
heads, intermediate 1536, vocabulary 49152, tied embeddings), built from its config, float32.
Random weights do not change the speed. Each row: a 32-token random prompt, greedy decoding;
ms per token is the decode time ``(t(1 + new) - t(1)) / new`` (the prefill and first token
subtracted), the best of ``--repeats`` runs after a warm-up. ``new`` is ``--new-tokens`` (64),
except for quantized layers without the cache, whose cost per token is the same at every
position and which are timed over ``--uncached-tokens`` (8) to keep the run short. Cached
rows must generate the same tokens as uncached ones (checked over the shorter run). Prints a
table and writes JSON to ``bench/results/generate-cpu-<date>.json``.

    python bench/generate_cpu.py                       # ~2 min on 2 idle cores
    OMP_NUM_THREADS=8 python bench/generate_cpu.py --json bench/results/generate-cpu-8threads.json

The committed results (``generate-cpu-2026-11-25.json``, ``-8threads.json``) were measured on
an otherwise idle 16-core Xeon with 2 and 8 threads: the 2 shared cores of the development
machine gave timings that varied by more than the effect measured.
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
from transformers import AutoConfig, AutoModelForCausalLM

import lowbit
from lowbit.eval import weight_bytes
from lowbit.nn import dense_cache

SMOLLM2_SHAPES = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 2048,
}  # fmt: skip
PROMPT_LENGTH = 32


def random_smollm2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **SMOLLM2_SHAPES)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        )  # fmt: skip
    return out[0, prompt.shape[1] :], time.perf_counter() - start


def decode_ms_per_token(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` decode time per token after a warm-up, and the tokens generated."""
    generate(model, prompt, 2)
    best = float("inf")
    for _ in range(repeats):
        _, first = generate(model, prompt, 1)
        tokens, total = generate(model, prompt, 1 + new_tokens)
        best = min(best, (total - first) / new_tokens)
    return 1000 * best, tokens


def cpu_model() -> str:
    """The processor's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default="int4-g128,nf4-dq")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--uncached-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=f"bench/results/generate-cpu-{datetime.date.today().isoformat()}.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    base = random_smollm2()
    prompt = torch.randint(0, SMOLLM2_SHAPES["vocab_size"], (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(1))
    float_ms, _ = decode_ms_per_token(base, prompt, args.new_tokens, args.repeats)
    rows = [{"model": "float32", "dense_cache": False, "ms_per_token": float_ms, "x_float": 1.0,
             "weight_bytes": weight_bytes(base), "cache_bytes": 0, "same_tokens": None}]  # fmt: skip
    print(f"float32: {float_ms:.1f} ms/token", flush=True)
    for scheme in args.schemes.split(","):
        model = lowbit.quantize(copy.deepcopy(base), scheme, progress=False)
        plain_ms, plain_tokens = decode_ms_per_token(model, prompt, args.uncached_tokens, args.repeats)
        with dense_cache(model) as cache_bytes:
            cached_ms, cached_tokens = decode_ms_per_token(model, prompt, args.new_tokens, args.repeats)
        same_tokens = bool(torch.equal(plain_tokens, cached_tokens[: plain_tokens.numel()]))
        for cached, ms in ((False, plain_ms), (True, cached_ms)):
            rows.append({"model": scheme, "dense_cache": cached, "ms_per_token": ms, "x_float": ms / float_ms,
                         "weight_bytes": weight_bytes(model), "cache_bytes": cache_bytes if cached else 0,
                         "same_tokens": same_tokens if cached else None})  # fmt: skip
            print(f"{scheme}{' + dense cache' if cached else ''}: {ms:.1f} ms/token", flush=True)
        del model

    header = f"{'model':<26}{'ms/token':>10}{'x float':>9}{'weights MB':>12}{'cache MB':>10}  same tokens"
    print(f"\nrandom SmolLM2-135M shapes, greedy, {args.new_tokens} new tokens after {PROMPT_LENGTH} "
          f"({args.uncached_tokens} without the cache), {torch.get_num_threads()} threads")  # fmt: skip
    print(header + "\n" + "-" * len(header))
    for row in rows:
        name = row["model"] + (" + dense cache" if row["dense_cache"] else "")
        same = "" if row["same_tokens"] is None else ("yes" if row["same_tokens"] else "NO")
        print(f"{name:<26}{row['ms_per_token']:>10.1f}{row['x_float']:>9.2f}{row['weight_bytes'] / 1e6:>12.1f}"
              f"{row['cache_bytes'] / 1e6:>10.1f}  {same}")  # fmt: skip
    protocol = {"prompt_tokens": PROMPT_LENGTH, "new_tokens": args.new_tokens, "uncached_new_tokens": args.uncached_tokens,
                "repeats": args.repeats, "ms_per_token": "decode only: (t(1 + new) - t(1)) / new, best of repeats"}  # fmt: skip
    machine = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "date": datetime.date.today().isoformat()}  # fmt: skip
    result = {"benchmark": "generate-cpu", "model": "random Llama with SmolLM2-135M shapes, float32",
              "protocol": protocol, "machine": machine, "rows": rows}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
