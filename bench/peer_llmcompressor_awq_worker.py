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

from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from peer_llmcompressor_gptq_worker import calibrated_oneshot  # same folder: the script's own
from safetensors.torch import load_file, save_file


def main() -> None:
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    model, out = calibrated_oneshot(
        lambda weights: [
            AWQModifier(),
            QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]),
        ]
    )
    tensors = load_file(out)
    tensors.update({name: p.detach().contiguous() for name, p in model.named_parameters() if p.dim() == 1 and "norm" in name})
    save_file(tensors, out)


if __name__ == "__main__":
    main()
