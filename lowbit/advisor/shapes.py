"""The shape of every parameter of a model, from its config alone.

The shapes follow a decoder-only transformer of the Llama layout: embeddings, attention with
q/k/v/o projections, a gated MLP or a mixture of gated experts, RMS norms, an ``lm_head``
unless it is tied to the embeddings. That layout covers Llama, Mistral, Mixtral, Qwen2/3 (dense
and MoE), Gemma 1-3, Phi-3 and Granite; what a family adds that its config does not say
(Qwen2's q/k/v biases, Gemma's extra norms) comes from its entry in the architecture table
(``lowbit.arch``). A ``model_type`` not in the table is taken to have the Llama layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from lowbit.arch import (
    ATTN_K,
    ATTN_OUTPUT,
    ATTN_Q,
    ATTN_V,
    FFN_DOWN,
    FFN_GATE,
    FFN_UP,
    GENERIC,
    KNOWN_ARCHITECTURES,
    LLAMA_LINEAR_KINDS,
    Architecture,
)
from lowbit.config import ConfigSource, read_config
from lowbit.errors import LowbitError

# Parameter kinds besides the linear ones, whose kinds are llama.cpp's tensor categories (lowbit.arch).
EMBEDDING, LM_HEAD, NORM, BIAS, ROUTER = "embedding", "lm_head", "norm", "bias", "router"
#: Kinds a lowbit format quantizes; everything else stays in 16 bits.
QUANTIZED_KINDS = frozenset({ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT, FFN_GATE, FFN_UP, FFN_DOWN})


def sizing_config(config_or_path: ConfigSource) -> dict[str, Any]:
    """The language model's config (``lowbit.config.read_config``), refused when sizing cannot
    model it: no MLP width, or multi-head latent attention."""
    config = read_config(config_or_path)
    if "intermediate_size" not in config and "moe_intermediate_size" not in config:
        raise LowbitError(
            "the config has no intermediate_size. Sizing needs the MLP width of a decoder-only "
            "transformer's config.json (Llama, Mistral, Qwen, Gemma, Phi-3 …)."
        )
    if config.get("kv_lora_rank"):
        raise LowbitError(
            "this config uses multi-head latent attention (kv_lora_rank, as DeepSeek-V2/V3 do), "
            "whose weights and KV cache the sizing advisor does not model yet."
        )
    return config


def architecture_for_sizing(config: dict[str, Any]) -> Architecture:
    """The table entry of the config's ``model_type``; the generic (Llama layout) one if none."""
    return KNOWN_ARCHITECTURES.get(config.get("model_type"), GENERIC)


class ParameterShape(NamedTuple):
    """One parameter: its name in the Llama layout, shape ``(out, in)`` or ``(n,)``, kind and layer."""

    name: str
    shape: tuple[int, ...]
    kind: str
    layer: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Dimensions:
    """The sizes a config fixes, with the defaults transformers applies when a field is absent."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int  # MLP width of dense layers
    experts: int  # 0 for a dense model
    expert_intermediate: int
    experts_per_token: int
    shared_expert_intermediate: int  # 0 when there is no shared expert
    moe_layers: frozenset[int]
    tied: bool
    attention_bias: bool  # q, k, v and o carry a bias
    qkv_bias: bool  # q, k and v carry a bias
    mlp_bias: bool
    architecture: Architecture

    @classmethod
    def of(cls, config: dict[str, Any]) -> Dimensions:
        architecture = architecture_for_sizing(config)
        layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
        experts = config.get("num_local_experts") or config.get("num_experts") or 0
        dense_width = config.get("intermediate_size") or config["moe_intermediate_size"]
        sparse_step = config.get("decoder_sparse_step") or 1
        dense_only = set(config.get("mlp_only_layers") or ())
        moe_layers = {i for i in range(layers) if experts and i not in dense_only and (i + 1) % sparse_step == 0}
        tied = config.get("tie_word_embeddings")
        return cls(
            hidden=config["hidden_size"],
            layers=layers,
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or architecture.default_head_dim or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            intermediate=dense_width,
            experts=experts,
            expert_intermediate=config.get("moe_intermediate_size") or dense_width,
            experts_per_token=config.get("num_experts_per_tok") or 1,
            shared_expert_intermediate=config.get("shared_expert_intermediate_size") or 0,
            moe_layers=frozenset(moe_layers),
            tied=architecture.tied_by_default if tied is None else bool(tied),
            attention_bias=bool(config.get("attention_bias")),
            qkv_bias=bool(config.get("qkv_bias", architecture.qkv_bias)),
            mlp_bias=bool(config.get("mlp_bias")),
            architecture=architecture,
        )

    @property
    def mlp_width(self) -> int:
        """Widest MLP activation per token: a dense MLP, or the routed experts plus the shared one."""
        routed = self.experts_per_token * self.expert_intermediate + self.shared_expert_intermediate
        dense = self.intermediate if len(self.moe_layers) < self.layers else 0
        return max(dense, routed if self.moe_layers else 0)


def parameter_shapes(config_or_path: ConfigSource) -> list[ParameterShape]:
    """Every parameter of the model, in the order of the Llama layout, computed from the config.

    Names follow transformers' Llama modules (``model.layers.0.self_attn.q_proj.weight``); other
    families name the same shapes differently (Phi-3's fused ``qkv_proj`` and ``gate_up_proj``
    hold q/k/v and gate/up stacked). Experts are listed one matrix each
    (``mlp.experts.3.down_proj.weight``), whatever layout a checkpoint stores them in. A tied
    ``lm_head`` is the embedding and is listed once, as ``model.embed_tokens.weight``.
    """
    dims = Dimensions.of(sizing_config(config_or_path))
    shapes = [ParameterShape("model.embed_tokens.weight", (dims.vocab, dims.hidden), EMBEDDING)]
    for layer in range(dims.layers):
        prefix = f"model.layers.{layer}"
        shapes += _norm_shapes(dims, prefix, layer)
        shapes += _attention_shapes(dims, prefix, layer)
        if layer in dims.moe_layers:
            shapes += _moe_shapes(dims, f"{prefix}.mlp", layer)
        else:
            shapes += _mlp_shapes(dims, f"{prefix}.mlp", dims.intermediate, layer)
    shapes.append(ParameterShape("model.norm.weight", (dims.hidden,), NORM))
    if not dims.tied:
        shapes.append(ParameterShape("lm_head.weight", (dims.vocab, dims.hidden), LM_HEAD))
    return shapes


def _linear_shapes(name: str, shape: tuple[int, int], kind: str, has_bias: bool, layer: int) -> list[ParameterShape]:
    weight = ParameterShape(f"{name}.weight", shape, kind, layer)
    return [weight, ParameterShape(f"{name}.bias", (shape[0],), BIAS, layer)] if has_bias else [weight]


def _norm_shapes(dims: Dimensions, prefix: str, layer: int) -> list[ParameterShape]:
    names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    return [
        ParameterShape(f"{prefix}.{name}.weight", (dims.hidden,), NORM, layer)
        for name in names[: dims.architecture.norms_per_layer]
    ]


def _attention_shapes(dims: Dimensions, prefix: str, layer: int) -> list[ParameterShape]:
    q_width, kv_width = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    qkv_bias = dims.attention_bias or dims.qkv_bias
    shape_and_bias = {
        ATTN_Q: ((q_width, dims.hidden), qkv_bias),
        ATTN_K: ((kv_width, dims.hidden), qkv_bias),
        ATTN_V: ((kv_width, dims.hidden), qkv_bias),
        ATTN_OUTPUT: ((dims.hidden, q_width), dims.attention_bias),
    }
    shapes = []
    for local, kind in LLAMA_LINEAR_KINDS.items():
        if kind in shape_and_bias:
            shape, has_bias = shape_and_bias[kind]
            shapes += _linear_shapes(f"{prefix}.{local}", shape, kind, has_bias, layer)
    if dims.architecture.qk_norm:
        shapes += [
            ParameterShape(f"{prefix}.self_attn.{name}.weight", (dims.head_dim,), NORM, layer)
            for name in ("q_norm", "k_norm")
        ]
    return shapes


def _mlp_shapes(dims: Dimensions, prefix: str, width: int, layer: int) -> list[ParameterShape]:
    """A gated MLP under ``prefix`` (``model.layers.0.mlp``, or an expert's ``...mlp.experts.3``)."""
    shape_of = {FFN_GATE: (width, dims.hidden), FFN_UP: (width, dims.hidden), FFN_DOWN: (dims.hidden, width)}
    shapes = []
    for local, kind in LLAMA_LINEAR_KINDS.items():
        if kind in shape_of:
            shapes += _linear_shapes(
                f"{prefix}.{local.removeprefix('mlp.')}", shape_of[kind], kind, dims.mlp_bias, layer
            )
    return shapes


def _moe_shapes(dims: Dimensions, prefix: str, layer: int) -> list[ParameterShape]:
    shapes = [ParameterShape(f"{prefix}.gate.weight", (dims.experts, dims.hidden), ROUTER, layer)]
    for expert in range(dims.experts):
        shapes += _mlp_shapes(dims, f"{prefix}.experts.{expert}", dims.expert_intermediate, layer)
    if dims.shared_expert_intermediate:
        shapes += _mlp_shapes(dims, f"{prefix}.shared_expert", dims.shared_expert_intermediate, layer)
        shapes.append(ParameterShape(f"{prefix}.shared_expert_gate.weight", (1, dims.hidden), ROUTER, layer))
    return shapes


def parameter_count(config_or_path: ConfigSource) -> int:
    """Number of parameters (a tied embedding counted once)."""
    return sum(p.numel for p in parameter_shapes(config_or_path))
