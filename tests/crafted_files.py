"""Small valid files to damage in the hardening and fuzz tests: a GGUF written with gguf-py's
own ``GGUFWriter`` from a tiny random llama, and the tiny model as a safetensors directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tiny_models import tiny_model

#: tiny llama's config -> GGUF metadata (the keys transformers reads back)
GGUF_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.value_length": "head_dim",
    "rope.dimension_count": "head_dim",
    "vocab_size": "vocab_size",
}


def write_tiny_gguf(path: Path, *, drop: tuple[str, ...] = (), metadata: dict | None = None, seed: int = 0) -> Path:
    """A tiny llama as a float32 GGUF file (tied embeddings: no ``output.weight``).

    ``drop``: GGUF tensor names left out; ``metadata``: config fields replaced (``None`` leaves
    a key out)."""
    import gguf

    model = tiny_model("llama", seed=seed)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    fields = {key: getattr(config, field) for key, field in GGUF_KEYS.items()}
    fields.update(metadata or {})
    for key, value in fields.items():
        if value is not None:
            writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied to the embedding
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if name not in drop:
            writer.add_tensor(name, np.ascontiguousarray(tensor.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_directory(path: Path, tokenizer=None, seed: int = 0) -> Path:
    """The tiny llama as a transformers safetensors directory (with ``tokenizer`` when given)."""
    tiny_model("llama", seed=seed).save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
