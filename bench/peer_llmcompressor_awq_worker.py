"""Runs inside the llm-compressor virtual environment (made by bench/peers.py's ``ensure_venv``).

Quantizes a float HF checkpoint with llm-compressor's AWQ (``oneshot`` with an
``AWQModifier`` with its defaults, n_grid 20, duo scaling, its mappings for Llama, followed
by a ``QuantizationModifier``: integer weights, asymmetric, groups of ``GROUP_SIZE``) on the
calibration token ids the caller gives (the same ones lowbit calibrates on), times it, and
writes the fake-quantized linear weights *and the norm weights AWQ's scales were folded
into* to a safetensors file (the linears alone would be scaled against the original norms).

llm-compressor pins its cached activations (``IntermediatesCache.pin_memory``), which fails
without an accelerator; it is replaced by a no-op here, which changes nothing else.

    python peer_llmcompressor_awq_worker.py MODEL_DIR CALIBRATION.safetensors OUT.safetensors BITS GROUP_SIZE
"""

import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from peer_llmcompressor_worker import (
    write_fake_quantized,  # same folder: the script's own
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, calibration, out = sys.argv[1], sys.argv[2], sys.argv[3]
    bits, group_size = int(sys.argv[4]), int(sys.argv[5])
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    ids = load_file(calibration)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group_size}
    recipe = [AWQModifier(), QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])]
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    write_fake_quantized(model, out, seconds)
    tensors = load_file(out)
    tensors.update({name: p.detach().contiguous() for name, p in model.named_parameters() if p.dim() == 1 and "norm" in name})
    save_file(tensors, out)


if __name__ == "__main__":
    main()
