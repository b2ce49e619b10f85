"""What llama.cpp needs to know of each model family: hyperparameter keys, tensor names, weight layouts.

Learned from llama.cpp's converter (``convert_hf_to_gguf.py`` and ``conversion/*.py`` in the
llama-cpp-python 0.3.36 sdist), written here for lowbit's families:

- hyperparameters: the keys ``TextModel.set_gguf_parameters`` writes (block count, context,
  widths, heads, RMS epsilon, RoPE base and scaling, key/value lengths), plus each family's own
  (Llama's vocabulary size and RoPE dimensions; Phi-3's original context and sliding window;
  Gemma 2's soft-capping and sliding window);
- tensor names: gguf-py's own table (``lowbit.gguf_names``), never a copy;
- layouts: Llama's q/k rows are permuted from transformers' rotate-half order into llama.cpp's
  interleaved pairs (``LlamaModel.permute``); Gemma stores RMSNorm weights as ``w - 1`` where
  llama.cpp multiplies by the stored value, so norms are written ``+ 1``; tied embeddings have
  no ``output.weight`` (llama.cpp reuses ``token_embd``), and Gemma never writes ``lm_head``;
- extra tensors: Llama 3's ``rope_freqs`` and Phi-3's long-context ``rope_factors_long/short``.

A family not in :data:`GGUF_FAMILIES` is refused with a list of those that are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gguf
import torch

from lowbit.errors import LowbitError
from lowbit.gguf_names import gguf_architecture

Hyperparameters = dict[str, Any]


def _rope(config: Hyperparameters) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in ``rope_parameters`` (older configs: ``rope_scaling``)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_theta" not in rope and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    return rope.get("full_attention", rope)


def head_dim(config: Hyperparameters) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _kv_heads(config: Hyperparameters) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def _common(writer: gguf.GGUFWriter, config: Hyperparameters) -> None:
    """``TextModel.set_gguf_parameters`` for the keys lowbit's families have."""
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(_kv_heads(config))
    rope = _rope(config)
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in (None, "default", "llama3", "longrope", "su"):
        raise LowbitError(f"RoPE scaling {rope_type!r} cannot be written to GGUF by lowbit (default, linear, yarn, llama3 can)")
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])


def _llama(writer: gguf.GGUFWriter, config: Hyperparameters) -> None:
    _common(writer, config)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim(config))


def _phi3(writer: gguf.GGUFWriter, config: Hyperparameters) -> None:
    rope = _rope(config)
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * config["hidden_size"]) // config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_rope_scaling_orig_ctx_len(
        rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings") or config["max_position_embeddings"]
    )
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(_kv_heads(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(rope_dims)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_sliding_window(config.get("sliding_window") or 0)  # 0 tells Phi-4 from Phi-3
    if rope.get("long_factor"):
        scale = config["max_position_embeddings"] / rope["original_max_position_embeddings"]
        kind = rope.get("rope_type", "").lower()
        if kind in ("su", "longrope"):
            factor = math.sqrt(1 + math.log(scale) / math.log(rope["original_max_position_embeddings"])) if scale > 1 else 1.0
        elif kind == "yarn":
            factor = 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0
        else:
            raise LowbitError(f"Phi-3 RoPE scaling {kind!r} cannot be written to GGUF (longrope and yarn can)")
        writer.add_rope_scaling_attn_factors(factor)


def _gemma(writer: gguf.GGUFWriter, config: Hyperparameters) -> None:
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(_kv_heads(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))


def _gemma2(writer: gguf.GGUFWriter, config: Hyperparameters) -> None:
    # llama.cpp scales Gemma 2's queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the
    # 46-layer 27B model; a config asking for anything else would run differently there
    scalar = config.get("query_pre_attn_scalar", head_dim(config))
    expected = config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 46 else head_dim(config)
    if scalar != expected:
        raise LowbitError(
            f"this Gemma 2 scales queries by 1/sqrt({scalar}); llama.cpp's gemma2 graph uses 1/sqrt({expected}) "
            "for its shape, so its GGUF would compute differently"
        )
    _gemma(writer, config)
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """``LlamaModel.permute``: each head's rows from rotate-half order (first half, second half)
    to llama.cpp's interleaved pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama_layout(name: str, tensor: torch.Tensor, config: Hyperparameters) -> torch.Tensor:
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_rows(tensor, config["num_attention_heads"])
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_rows(tensor, _kv_heads(config))
    return tensor


def _gemma_layout(name: str, tensor: torch.Tensor, config: Hyperparameters) -> torch.Tensor:
    return tensor + 1 if name.endswith("norm.weight") else tensor


def _same_layout(name: str, tensor: torch.Tensor, config: Hyperparameters) -> torch.Tensor:
    return tensor


def _llama3_rope_freqs(config: Hyperparameters) -> Iterator[tuple[str, torch.Tensor]]:
    """``LlamaModel.generate_extra_tensors``: per-frequency factors of Llama 3's RoPE scaling."""
    rope = _rope(config)
    if rope.get("rope_type", "").lower() != "llama3":
        return
    dim = head_dim(config)
    freqs = 1.0 / (rope.get("rope_theta", 10000.0) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    yield "rope_freqs.weight", torch.tensor(factors, dtype=torch.float32)


def _phi3_rope_factors(config: Hyperparameters) -> Iterator[tuple[str, torch.Tensor]]:
    rope = _rope(config)
    if not rope.get("long_factor"):
        return
    yield "rope_factors_long.weight", torch.tensor(rope["long_factor"], dtype=torch.float32)
    yield "rope_factors_short.weight", torch.tensor(rope["short_factor"], dtype=torch.float32)


def _no_extras(config: Hyperparameters) -> Iterator[tuple[str, torch.Tensor]]:
    return iter(())


@dataclass(frozen=True)
class GgufFamily:
    """How one transformers ``model_type`` becomes a llama.cpp architecture."""

    hyperparameters: Callable[[gguf.GGUFWriter, Hyperparameters], None]
    #: ``(hf_name, tensor, config) -> tensor`` as llama.cpp stores it
    layout: Callable[[str, torch.Tensor, Hyperparameters], torch.Tensor] = _same_layout
    #: ``config -> (gguf_name, float32 tensor)`` that transformers computes and llama.cpp stores
    extra_tensors: Callable[[Hyperparameters], Iterator[tuple[str, torch.Tensor]]] = _no_extras
    #: ``lm_head`` is never written (Gemma's is always its embeddings)
    drop_lm_head: bool = False


GGUF_FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily(_llama, _llama_layout, _llama3_rope_freqs),
    "mistral": GgufFamily(_llama, _llama_layout, _llama3_rope_freqs),
    "qwen2": GgufFamily(_common),
    "qwen3": GgufFamily(_common),
    "phi3": GgufFamily(_phi3, extra_tensors=_phi3_rope_factors),
    "gemma": GgufFamily(_gemma, _gemma_layout, drop_lm_head=True),
    "gemma2": GgufFamily(_gemma2, _gemma_layout, drop_lm_head=True),
}


def gguf_family(config: Hyperparameters) -> tuple[str, GgufFamily]:
    """``(llama.cpp architecture, family)`` of a config, or an error naming the supported families."""
    model_type = config.get("model_type")
    if model_type not in GGUF_FAMILIES:
        raise LowbitError(
            f"lowbit cannot write a {model_type!r} model as GGUF; it writes {', '.join(GGUF_FAMILIES)}"
        )
    return gguf_architecture(model_type), GGUF_FAMILIES[model_type]
