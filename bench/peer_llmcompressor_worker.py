"""Runs inside the llm-compressor virtual environment (made by bench/foundation.py).

Quantizes a float HF checkpoint with llm-compressor's data-free round-to-nearest
(``oneshot`` with a ``QuantizationModifier``), times it, and writes the fake-quantized
(dequantized) linear weights to a safetensors file, so the caller evaluates them with the
same windows and reference as lowbit's rows.

    python peer_llmcompressor_worker.py MODEL_DIR OUT.safetensors BITS GROUP_SIZE SYMMETRIC
    (GROUP_SIZE 0 = per channel)
"""

import json
import sys
import time

import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def write_fake_quantized(model, out: str, seconds: float) -> None:
    """Write the dequantized weights of every linear llm-compressor quantized, and report."""
    tensors = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if isinstance(module, torch.nn.Linear) and scheme is not None and hasattr(module, "weight_scale"):
                zero = getattr(module, "weight_zero_point", None)
                tensors[f"{name}.weight"] = fake_quantize(module.weight, module.weight_scale, zero, scheme.weights).contiguous()
    save_file(tensors, out)
    print(json.dumps({"seconds": seconds, "modules": len(tensors)}))


def main() -> None:
    model_dir, out, bits, group_size, symmetric = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric}
    weights.update({"strategy": "group", "group_size": group_size} if group_size else {"strategy": "channel"})
    recipe = QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    start = time.perf_counter()
    oneshot(model=model, recipe=recipe)
    seconds = time.perf_counter() - start
    write_fake_quantized(model, out, seconds)


if __name__ == "__main__":
    main()
