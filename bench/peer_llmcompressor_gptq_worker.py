"""Runs inside the llm-compressor virtual environment (made by bench/peers.py's ``ensure_venv``).

Quantizes a float HF checkpoint with llm-compressor's GPTQ (``oneshot`` with a
``GPTQModifier``: integer weights, asymmetric, groups of ``GROUP_SIZE``, its defaults
otherwise: block 128, dampening 0.01, activation ordering "static", min-max observer) on the
calibration token ids the caller gives (the same ones lowbit calibrates on), times it, and
writes the fake-quantized (dequantized) linear weights to a safetensors file.

    python peer_llmcompressor_gptq_worker.py MODEL_DIR CALIBRATION.safetensors OUT.safetensors BITS GROUP_SIZE
"""

import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from peer_llmcompressor_worker import write_fake_quantized  # same folder: the script's own
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def calibrated_oneshot(recipe_for):
    """Run ``oneshot`` with ``recipe_for(weights)`` on the calibration ids of the command line
    (``MODEL_DIR CALIBRATION OUT BITS GROUP_SIZE``, asymmetric integer weights in groups), time
    it and write the fake-quantized weights to OUT; returns ``(model, OUT)``."""
    model_dir, calibration, out = sys.argv[1], sys.argv[2], sys.argv[3]
    bits, group_size = int(sys.argv[4]), int(sys.argv[5])
    ids = load_file(calibration)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group_size}
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe_for(weights),
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    write_fake_quantized(model, out, seconds)
    return model, out


def main() -> None:
    calibrated_oneshot(
        lambda weights: GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    )


if __name__ == "__main__":
    main()
