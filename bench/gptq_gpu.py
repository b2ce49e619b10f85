"""GPTQ seconds per block and peak GPU memory on a Llama-3-8B-shaped random model (issue 13's GPU row).

The model: Llama-3-8B's widths (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocabulary
128256), ``--layers`` decoder layers (32 for the whole model), random bfloat16 weights, kept in
CPU memory: lowbit's pipeline moves one layer at a time to the GPU, as it does for a real model.
The embedding and rotary tables sit on the GPU, so the calibration activations stay there
(``--activations cpu``: in CPU memory, a batch at a time on the GPU).
Calibration: 128 x 2048 random token ids (``--samples``, ``--length``). Plan: ``int4-g128`` GPTQ
(dynamic groups; ``--act-order`` for llm-compressor's default static act-order), lm_head kept.

Reported: total seconds, seconds to capture the first layer's inputs, seconds per block
(the rest over the layers), and within the blocks the seconds spent collecting Hessians
(layer runs + ``XᵀX``), preparing them (damping, Cholesky, inverse) and in the column loops;
peak GPU memory (``max_memory_allocated``) and peak RSS. ``--torch-loop`` turns the Triton
kernel off (the per-column torch loop, for a before/after). JSON into ``--out``.

    python bench/gptq_gpu.py --layers 32
    python bench/gptq_gpu.py --layers 2 --torch-loop
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)  # not bench/: its gguf.py would shadow gguf-py

import lowbit
from lowbit.algorithms import gptq
from lowbit.pipeline import LayerBlock, quantize_model
from lowbit.plan import Plan, make_rule


def llama3_8b_shaped(layers: int, activations: str) -> torch.nn.Module:
    """Random bf16 weights drawn on the GPU (fast), then moved to the CPU; the embedding and
    rotary tables stay on the GPU with ``activations="cuda"`` (the calibration activations
    then live there), else they move to the CPU too (activations in CPU memory, each batch
    copied to the GPU and back, as llm-compressor offloads them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.02)
    model.model.layers.to("cpu")
    model.lm_head.to("cpu")
    if activations == "cpu":
        model.to("cpu")
    torch.cuda.empty_cache()
    return model.eval()


class Timers:
    """Seconds spent in wrapped functions, each ended with a CUDA synchronisation."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--activations", choices=("cuda", "cpu"), default="cuda", help="where the calibration activations live")
    parser.add_argument("--torch-loop", action="store_true", help="the per-column torch loop, not the Triton kernel")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    if args.torch_loop:
        gptq.on_kernel = lambda *_: False
    start = time.perf_counter()
    model = llama3_8b_shaped(args.layers, args.activations)
    build_seconds = time.perf_counter() - start
    tokens = torch.randint(0, 128256, (args.samples, args.length), generator=torch.Generator().manual_seed(0))
    options = {"format": "int4-g128", "algorithm": "gptq", "act_order": args.act_order}
    plan = Plan([make_rule("lm_head", "keep"), make_rule("*", options)], "int4-g128 gptq")

    timers = Timers()
    timers.wrap(LayerBlock, "collect", "collect_hessians")
    timers.wrap(LayerBlock, "run", "next_layer_inputs")
    timers.wrap(gptq, "prepare_hessian", "prepare_hessians")
    timers.wrap(gptq, "gptq_quantize_stacked", "column_loops")
    timers.wrap(sys.modules["lowbit.pipeline"], "capture_layer_inputs", "capture")
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    quantize_model(model, plan, calibration=tokens, device="cuda", batch_size=args.batch_size, progress=False)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    per_block = (total - timers.seconds["capture"]) / args.layers
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "lowbit": lowbit.__version__,
        "model": "Llama-3-8B-shaped, random bf16 weights",
        "layers": args.layers,
        "calibration": f"{args.samples}x{args.length} random tokens",
        "plan": "int4-g128 gptq" + (" act_order (static groups)" if args.act_order else " (dynamic groups)"),
        "column_loop": "torch" if args.torch_loop else "triton",
        "activations_on": args.activations,
        "build_seconds": round(build_seconds, 2),
        "total_seconds": round(total, 2),
        "seconds_per_block": round(per_block, 3),
        "per_block": {label: round(seconds / args.layers, 3) for label, seconds in timers.seconds.items() if label != "capture"},
        "capture_seconds": round(timers.seconds["capture"], 2),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print(json.dumps(report, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("-actorder" if args.act_order else "") + ("-torchloop" if args.torch_loop else "")
    suffix += "-cpu-activations" if args.activations == "cpu" else ""
    path = out / f"gptq-gpu-{report['date'][:10]}-{args.layers}layers{suffix}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
