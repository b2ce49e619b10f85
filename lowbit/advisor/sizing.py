"""How much memory a model needs, in every format, from its ``config.json`` alone.

No weight is read: the shape of every parameter follows from the config of a decoder-only
transformer of the Llama shape (embeddings, attention with q/k/v/o projections, a gated MLP or
a mixture of gated experts, RMS norms, an ``lm_head`` unless it is tied to the embeddings).
That shape covers Llama, Mistral, Mixtral, Qwen2/3 (dense and MoE), Gemma 1-3, Phi-3 and
Granite; what a family adds that its config does not say (Qwen2's q/k/v biases, Gemma's extra
norms) is one row of ``FAMILY_LAYOUTS``.

How the bytes are counted (``ASSUMPTIONS`` repeats this in every report):

- **lowbit formats** quantize the linear layers of the decoder blocks: attention q/k/v/o and
  MLP gate/up/down, every expert included. Each matrix costs exactly what the format stores for
  it (``Format.storage_bytes``: codes, scales and zero points, a partial last group included).
  Token embeddings and ``lm_head`` stay in 16 bits, as lowbit keeps them by default, and so do
  norms, biases and MoE routers (a handful of small, sensitive tensors no quantizer touches).
  In ``fp32`` everything is 4 bytes. So in ``bf16`` every parameter is exactly 2 bytes and the
  familiar "2 bytes x parameters" figures come out; in a 4-bit format the 16-bit embeddings
  add a visible share for models with a large vocabulary (Llama-3: 2 x 1.05 B parameters).
- **GGUF mixes** (``gguf:Q4_K_M`` …) follow llama.cpp's ``llama-quantize``: the type of each
  tensor is chosen by the rules of ``llama_tensor_get_type`` (src/llama-quant.cpp), written
  here as data in ``GGUF_MIXES``; rows that are not a multiple of a type's block fall back as
  ``tensor_type_fallback`` does. ``token_embd`` and ``output`` are quantized as the mix says;
  norms, biases and routers are F32 as ``convert_hf_to_gguf.py`` writes them. The figure is the
  tensor data; a file adds its metadata and tokenizer (a few MB).
- **KV cache**: K and V for every layer, ``num_key_value_heads x head_dim`` values per token
  (so GQA models need ``num_attention_heads / num_key_value_heads`` times less than MHA), 16
  bits per value. A sliding-window layer keeps at most its window, as transformers' and
  llama.cpp's caches do by default.
- **Activations** of one forward over ``batch x context`` tokens with fused attention (no
  ``context x context`` score matrix): per token ``2 x hidden + 3 x MLP width`` values in 16
  bits, plus fp32 logits for the last token of each sequence. Runtimes that feed the prompt in
  chunks (llama.cpp, vLLM) need less.
- **Overhead**: ``RUNTIME_OVERHEAD_BYTES`` (1 GiB) for the CUDA context, library workspaces and
  allocator fragmentation.

A format *fits* when weights + KV cache + activations + overhead <= GPU memory. Sizes are in
bytes; ``GB`` means 10^9 bytes and ``GiB`` 2^30 bytes (a card sold as "24 GB" has 24 GiB).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lowbit.errors import LowbitError, UnknownNameError
from lowbit.formats import get_format

GB = 10**9
GiB = 2**30

#: CUDA context (0.3-0.6 GiB with PyTorch), cuBLAS/cuDNN workspaces and allocator fragmentation.
RUNTIME_OVERHEAD_BYTES = GiB
#: Bytes of a value kept in 16 bits (bf16 or fp16): KV cache, activations, unquantized tensors.
HALF_BYTES = 2

#: How every figure is counted; each report carries this under "assumptions".
ASSUMPTIONS = {
    "lowbit_formats": (
        "the linear layers of the decoder blocks (attention q/k/v/o, MLP gate/up/down, every expert "
        "included) take the format's exact storage size, scales, zero points and partial groups "
        "included; token embeddings and lm_head stay in 16 bits (bf16) as lowbit keeps them by "
        "default, and so do norms, biases and MoE routers; in fp32 everything is fp32."
    ),
    "gguf": (
        "each tensor gets the type llama.cpp's llama-quantize gives it in that mix "
        "(llama_tensor_get_type, no importance matrix), with its fallbacks for rows that are not a "
        "multiple of a block; token_embd and output are quantized as the mix says; norms, biases and "
        "routers are F32. Tensor data only: a .gguf file adds metadata and the tokenizer (a few MB)."
    ),
    "kv_cache": (
        "K and V of every layer, num_key_value_heads x head_dim values per token (GQA aware), 16 bits "
        "per value; sliding-window layers keep at most their window."
    ),
    "activations": (
        "one forward over batch x context tokens with fused attention: per token 2 x hidden + 3 x MLP "
        "width values in 16 bits, plus fp32 logits of the last token of each sequence; runtimes that "
        "feed the prompt in chunks (llama.cpp, vLLM) need less."
    ),
    "overhead": "1 GiB for the CUDA context, library workspaces and allocator fragmentation.",
    "fits": (
        "weights + KV cache + activations + overhead <= GPU memory. GB = 10^9 bytes, GiB = 2^30 bytes; "
        "a card sold as '24 GB' has 24 GiB."
    ),
}

# ---------------------------------------------------------------------------------------------
# Reading a config
# ---------------------------------------------------------------------------------------------

ConfigSource = dict[str, Any] | str | os.PathLike

REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
#: Fields a multimodal ``text_config`` may leave to its parent config.
INHERITED_FIELDS = ("vocab_size", "tie_word_embeddings", "architectures", "_name_or_path")


def read_config(config_or_path: ConfigSource) -> dict[str, Any]:
    """The config of the language model: from a dict, a ``config.json``, or a directory holding one.

    A native lowbit checkpoint is a Hugging Face directory, so it is read the same way. A
    multimodal config's ``text_config`` is the language model, and is what is returned (fields
    it leaves to its parent, such as ``vocab_size``, are taken from there). Raises
    :class:`LowbitError` saying what is wrong when the path, the JSON or the fields are not usable.
    """
    return _language_model_config(_raw_config(config_or_path))


def _raw_config(config_or_path: ConfigSource) -> dict[str, Any]:
    """The config as given: a copy of the dict, or the parsed file, named after its directory."""
    if isinstance(config_or_path, dict):
        return dict(config_or_path)
    if not isinstance(config_or_path, (str, os.PathLike)):
        raise LowbitError(
            f"expected a config dict, a config.json path or a model directory, got {type(config_or_path).__name__}"
        )
    path = Path(config_or_path)
    file = _config_file(path)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LowbitError(
            f"{file} is not valid JSON ({error}). Give the model's config.json as published with it "
            "(download it again if it was cut short)."
        ) from None
    if not isinstance(config, dict):
        raise LowbitError(f"{file} holds a JSON {type(config).__name__}, but a config.json is a JSON object.")
    config["_name_or_path"] = str(path if path.is_dir() or file.name != "config.json" else file.parent)
    return config


def _config_file(path: Path) -> Path:
    if not path.exists():
        raise LowbitError(
            f"{path} does not exist. Give a config.json file, or a model directory that holds one "
            "(a Hugging Face or lowbit checkpoint)."
        )
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise LowbitError(
                f"{path} is a directory without a config.json. Give the directory of a Hugging Face "
                "or lowbit checkpoint, or the path of the config.json file itself."
            )
        return file
    return path


def _language_model_config(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` itself, or its ``text_config`` with the fields it inherits; validated."""
    config = raw
    if isinstance(raw.get("text_config"), dict):
        inherited = {field: raw[field] for field in INHERITED_FIELDS if field in raw}
        config = {**inherited, **raw["text_config"]}
    _check_fields(config)
    return config


def _check_fields(config: dict[str, Any]) -> None:
    missing = [field for field in REQUIRED_FIELDS if field not in config]
    if "intermediate_size" not in config and "moe_intermediate_size" not in config:
        missing.append("intermediate_size")
    if missing:
        raise LowbitError(
            f"the config has no {', '.join(missing)}. Sizing needs hidden_size, num_hidden_layers, "
            "num_attention_heads, vocab_size and intermediate_size, the fields of a decoder-only "
            "transformer's config.json (Llama, Mistral, Qwen, Gemma, Phi-3 …); encoder-decoder and "
            "GPT-2 style configs name them differently and are not supported."
        )
    for field in (*REQUIRED_FIELDS, "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size"):
        value = config.get(field)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise LowbitError(f"{field} must be a positive integer in the config, got {value!r}.")
    if config.get("kv_lora_rank"):
        raise LowbitError(
            "this config uses multi-head latent attention (kv_lora_rank, as DeepSeek-V2/V3 do), "
            "whose weights and KV cache the sizing advisor does not model yet."
        )
    if config.get("head_dim") is None and config["hidden_size"] % config["num_attention_heads"]:
        raise LowbitError(
            f"hidden_size {config['hidden_size']} is not a multiple of num_attention_heads "
            f"{config['num_attention_heads']} and the config gives no head_dim."
        )


# ---------------------------------------------------------------------------------------------
# The shape of every parameter
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyLayout:
    """What a model family adds to the Llama layout that its config.json does not say."""

    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2), unless the config says otherwise
    qk_norm: bool = False  # an RMSNorm over head_dim for q and for k in every layer (Qwen3, Gemma3)
    norms_per_layer: int = 2  # Gemma2/3 add a norm before and after the MLP
    tied_by_default: bool = False  # tie_word_embeddings when the config omits it
    sliding_window_pattern: int | None = None  # every N-th layer attends fully, the others slide


LLAMA_LAYOUT = FamilyLayout()

#: ``model_type`` -> layout. A type not listed here is taken to have the Llama layout (with a note).
FAMILY_LAYOUTS: dict[str, FamilyLayout] = {
    "llama": LLAMA_LAYOUT,
    "mistral": LLAMA_LAYOUT,
    "mixtral": LLAMA_LAYOUT,
    "phi3": LLAMA_LAYOUT,  # fused qkv_proj and gate_up_proj hold the same shapes
    "granite": LLAMA_LAYOUT,
    "qwen2": FamilyLayout(qkv_bias=True),
    "qwen2_moe": FamilyLayout(qkv_bias=True),
    "qwen3": FamilyLayout(qk_norm=True),
    "qwen3_moe": FamilyLayout(qk_norm=True),
    "gemma": FamilyLayout(tied_by_default=True),
    "gemma2": FamilyLayout(norms_per_layer=4, tied_by_default=True, sliding_window_pattern=2),
    "gemma3_text": FamilyLayout(qk_norm=True, norms_per_layer=4, tied_by_default=True, sliding_window_pattern=6),
}

# Parameter kinds. The linear ones are named after llama.cpp's tensor categories, whose mixes key on them.
EMBEDDING, LM_HEAD, NORM, BIAS, ROUTER = "embedding", "lm_head", "norm", "bias", "router"
ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT = "attn_q", "attn_k", "attn_v", "attn_output"
FFN_GATE, FFN_UP, FFN_DOWN = "ffn_gate", "ffn_up", "ffn_down"
#: Kinds a lowbit format quantizes; everything else stays in 16 bits.
QUANTIZED_KINDS = frozenset({ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT, FFN_GATE, FFN_UP, FFN_DOWN})


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
    layout: FamilyLayout

    @classmethod
    def of(cls, config: dict[str, Any]) -> Dimensions:
        layout = FAMILY_LAYOUTS.get(config.get("model_type"), LLAMA_LAYOUT)
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
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            intermediate=dense_width,
            experts=experts,
            expert_intermediate=config.get("moe_intermediate_size") or dense_width,
            experts_per_token=config.get("num_experts_per_tok") or 1,
            shared_expert_intermediate=config.get("shared_expert_intermediate_size") or 0,
            moe_layers=frozenset(moe_layers),
            tied=layout.tied_by_default if tied is None else bool(tied),
            attention_bias=bool(config.get("attention_bias")),
            qkv_bias=bool(config.get("qkv_bias", layout.qkv_bias)),
            mlp_bias=bool(config.get("mlp_bias")),
            layout=layout,
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
    families name the same shapes differently. Experts are listed one matrix each
    (``mlp.experts.3.down_proj.weight``), whatever layout a checkpoint stores them in. A tied
    ``lm_head`` is the embedding and is listed once, as ``model.embed_tokens.weight``.
    """
    dims = Dimensions.of(read_config(config_or_path))
    shapes = [ParameterShape("model.embed_tokens.weight", (dims.vocab, dims.hidden), EMBEDDING)]
    for layer in range(dims.layers):
        prefix = f"model.layers.{layer}"
        shapes += _norm_shapes(dims, prefix, layer)
        shapes += _attention_shapes(dims, f"{prefix}.self_attn", layer)
        if layer in dims.moe_layers:
            shapes += _moe_shapes(dims, f"{prefix}.mlp", layer)
        else:
            shapes += _mlp_shapes(dims, f"{prefix}.mlp", dims.intermediate, layer)
    shapes.append(ParameterShape("model.norm.weight", (dims.hidden,), NORM))
    if not dims.tied:
        shapes.append(ParameterShape("lm_head.weight", (dims.vocab, dims.hidden), LM_HEAD))
    return shapes


def _norm_shapes(dims: Dimensions, prefix: str, layer: int) -> list[ParameterShape]:
    names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    return [
        ParameterShape(f"{prefix}.{name}.weight", (dims.hidden,), NORM, layer)
        for name in names[: dims.layout.norms_per_layer]
    ]


def _attention_shapes(dims: Dimensions, prefix: str, layer: int) -> list[ParameterShape]:
    q_width, kv_width = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    projections = (
        ("q_proj", (q_width, dims.hidden), ATTN_Q, dims.attention_bias or dims.qkv_bias),
        ("k_proj", (kv_width, dims.hidden), ATTN_K, dims.attention_bias or dims.qkv_bias),
        ("v_proj", (kv_width, dims.hidden), ATTN_V, dims.attention_bias or dims.qkv_bias),
        ("o_proj", (dims.hidden, q_width), ATTN_OUTPUT, dims.attention_bias),
    )
    shapes = []
    for name, shape, kind, has_bias in projections:
        shapes.append(ParameterShape(f"{prefix}.{name}.weight", shape, kind, layer))
        if has_bias:
            shapes.append(ParameterShape(f"{prefix}.{name}.bias", (shape[0],), BIAS, layer))
    if dims.layout.qk_norm:
        shapes += [
            ParameterShape(f"{prefix}.{name}.weight", (dims.head_dim,), NORM, layer) for name in ("q_norm", "k_norm")
        ]
    return shapes


def _mlp_shapes(dims: Dimensions, prefix: str, width: int, layer: int) -> list[ParameterShape]:
    projections = (
        ("gate_proj", (width, dims.hidden), FFN_GATE),
        ("up_proj", (width, dims.hidden), FFN_UP),
        ("down_proj", (dims.hidden, width), FFN_DOWN),
    )
    shapes = []
    for name, shape, kind in projections:
        shapes.append(ParameterShape(f"{prefix}.{name}.weight", shape, kind, layer))
        if dims.mlp_bias:
            shapes.append(ParameterShape(f"{prefix}.{name}.bias", (shape[0],), BIAS, layer))
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


# ---------------------------------------------------------------------------------------------
# GGUF: block types and llama.cpp's mixes, as data
# ---------------------------------------------------------------------------------------------
# A later step adds real GGUF formats in lowbit/formats/gguf.py; these tables then come from there.


@dataclass(frozen=True)
class GgufType:
    """A ggml tensor type: ``block_size`` weights of a row take ``block_bytes`` bytes."""

    block_size: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_size


#: Block geometry from the ``block_*`` structs of ggml-common.h (``sizeof`` of each block).
GGUF_TYPES: dict[str, GgufType] = {
    "F32": GgufType(1, 4),
    "F16": GgufType(1, 2),
    "Q4_0": GgufType(32, 18),  # fp16 scale, 32 x 4 bits
    "Q4_1": GgufType(32, 20),  # fp16 scale and min, 32 x 4 bits
    "Q5_0": GgufType(32, 22),  # fp16 scale, 32 fifth bits, 32 x 4 bits
    "Q5_1": GgufType(32, 24),  # fp16 scale and min, 32 fifth bits, 32 x 4 bits
    "Q8_0": GgufType(32, 34),  # fp16 scale, 32 x 8 bits
    "Q2_K": GgufType(256, 84),  # 16 packed 4-bit scale/min pairs, 256 x 2 bits, fp16 d and dmin
    "Q3_K": GgufType(256, 110),  # 256 high bits, 256 x 2 bits, 16 x 6-bit scales, fp16 d
    "Q4_K": GgufType(256, 144),  # fp16 d and dmin, 8 x 6-bit scale/min pairs, 256 x 4 bits
    "Q5_K": GgufType(256, 176),  # as Q4_K plus 256 fifth bits
    "Q6_K": GgufType(256, 210),  # 256 x 4 low bits, 256 x 2 high bits, 16 x 8-bit scales, fp16 d
}

#: ``tensor_type_fallback``: the type used when a row is not a multiple of the block; F16 after that.
GGUF_FALLBACKS = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class LayerSite:
    """Where a tensor sits, as llama.cpp's type rules see it."""

    layer: int | None
    layers: int
    gqa_ratio: int  # n_head / n_head_kv
    experts: int


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


#: The conditions a rule may name; each is true or false for a tensor at a ``LayerSite``.
RULE_CONDITIONS: dict[str, Callable[[LayerSite], bool]] = {
    "always": lambda site: True,
    "more_bits": lambda site: use_more_bits(site.layer, site.layers),
    "first_eighth": lambda site: site.layer < site.layers // 8,
    "first_sixteenth": lambda site: site.layer < site.layers // 16,
    "first_2_layers": lambda site: site.layer < 2,
    "first_4_layers": lambda site: site.layer < 4,
    "gqa_4": lambda site: site.gqa_ratio >= 4,
    "8_experts": lambda site: site.experts == 8,
    # llama.cpp's LLM_TYPE_70B: 80 layers with grouped-query attention (Llama-2/3-70B, Qwen2-72B)
    "70b": lambda site: site.layers == 80 and site.gqa_ratio > 1,
}


@dataclass(frozen=True)
class TypeRule:
    """Tensors of ``kind`` get ``gguf_type`` when the condition ``when`` holds."""

    kind: str
    gguf_type: str
    when: str = "always"


@dataclass(frozen=True)
class TypePromotion:
    """After the rules: tensors of ``kind`` that got one of ``replaces`` get ``gguf_type`` when ``when`` holds."""

    kind: str
    replaces: tuple[str, ...]
    gguf_type: str
    when: str


@dataclass(frozen=True)
class GgufMix:
    """A llama-quantize file type: the base type, and the rules that pick other types per tensor.

    The first rule that matches a tensor decides its type; a tensor no rule matches gets
    ``base``. ``output`` (and a tied ``token_embd``) gets ``output_type``, or Q8_0 when its rows
    are not a multiple of the base type's block.
    """

    base: str
    rules: tuple[TypeRule, ...] = ()
    output_type: str = "Q6_K"


#: Rules every mix applies before its own (llama.cpp bumps Mixtral-style 8-expert models' K and V).
COMMON_RULES = (TypeRule(ATTN_V, "Q8_0", "8_experts"), TypeRule(ATTN_K, "Q8_0", "8_experts"))
#: 70B models: attn_v is 8x smaller than attn_q, so a better type costs almost nothing.
PROMOTIONS = (TypePromotion(ATTN_V, ("Q3_K", "Q4_K"), "Q5_K", "70b"),)

#: llama-quantize's mixes from 8 bits down to 2, as ``llama_tensor_get_type_impl`` picks them without an
#: importance matrix.
GGUF_MIXES: dict[str, GgufMix] = {
    "Q8_0": GgufMix("Q8_0", output_type="Q8_0"),
    "Q6_K": GgufMix("Q6_K"),
    "Q5_K_M": GgufMix("Q5_K", (TypeRule(ATTN_V, "Q6_K", "more_bits"), TypeRule(FFN_DOWN, "Q6_K", "more_bits"))),
    "Q5_K_S": GgufMix("Q5_K"),
    "Q5_1": GgufMix("Q5_1"),
    "Q5_0": GgufMix("Q5_0"),
    "Q4_K_M": GgufMix(
        "Q4_K",
        (
            TypeRule(ATTN_V, "Q6_K", "more_bits"),
            TypeRule(FFN_DOWN, "Q6_K", "more_bits"),
            TypeRule(ATTN_OUTPUT, "Q5_K", "8_experts"),
        ),
    ),
    "Q4_K_S": GgufMix(
        "Q4_K",
        (
            TypeRule(ATTN_V, "Q5_K", "first_4_layers"),
            TypeRule(FFN_DOWN, "Q5_K", "first_eighth"),
            TypeRule(ATTN_OUTPUT, "Q5_K", "8_experts"),
        ),
    ),
    "Q4_1": GgufMix("Q4_1"),
    "Q4_0": GgufMix("Q4_0"),
    "Q3_K_L": GgufMix(
        "Q3_K",
        (
            TypeRule(ATTN_V, "Q5_K"),
            TypeRule(FFN_DOWN, "Q5_K"),
            TypeRule(ATTN_OUTPUT, "Q3_K", "8_experts"),
            TypeRule(ATTN_OUTPUT, "Q5_K"),
        ),
    ),
    "Q3_K_M": GgufMix(
        "Q3_K",
        (
            TypeRule(ATTN_V, "Q5_K", "first_2_layers"),
            TypeRule(ATTN_V, "Q4_K"),
            TypeRule(FFN_DOWN, "Q5_K", "first_sixteenth"),
            TypeRule(FFN_DOWN, "Q4_K"),
            TypeRule(ATTN_OUTPUT, "Q5_K", "8_experts"),
            TypeRule(ATTN_OUTPUT, "Q4_K"),
        ),
    ),
    "Q3_K_S": GgufMix("Q3_K", (TypeRule(ATTN_OUTPUT, "Q5_K", "8_experts"),)),
    "Q2_K": GgufMix(
        "Q2_K",
        (
            TypeRule(ATTN_V, "Q4_K", "gqa_4"),
            TypeRule(ATTN_V, "Q3_K"),
            TypeRule(FFN_DOWN, "Q3_K"),
            TypeRule(ATTN_OUTPUT, "Q5_K", "8_experts"),
            TypeRule(ATTN_OUTPUT, "Q3_K"),
        ),
    ),
}

GGUF_PREFIX = "gguf:"
#: Tensors llama-quantize never quantizes; convert_hf_to_gguf.py writes them as F32.
GGUF_F32_KINDS = frozenset({NORM, BIAS, ROUTER})


def gguf_mix(name: str) -> GgufMix:
    """The mix called ``name`` (``gguf:Q4_K_M`` or ``Q4_K_M``, any case)."""
    key = name.strip().upper().removeprefix(GGUF_PREFIX.upper())
    if key not in GGUF_MIXES:
        raise UnknownNameError(
            f"unknown GGUF mix {name!r}. Known mixes: {', '.join(GGUF_PREFIX + m for m in GGUF_MIXES)}."
        )
    return GGUF_MIXES[key]


def gguf_tensor_types(config_or_path: ConfigSource, mix_name: str) -> list[tuple[str, str]]:
    """``(parameter name, ggml type)`` for every tensor, as llama-quantize would write the mix."""
    config = read_config(config_or_path)
    dims, mix = Dimensions.of(config), gguf_mix(mix_name)
    return [(p.name, _gguf_type(p, mix, dims)) for p in parameter_shapes(config)]


def _gguf_type(parameter: ParameterShape, mix: GgufMix, dims: Dimensions) -> str:
    """The rules of ``llama_tensor_get_type`` for one tensor, then the fallback for its row length."""
    if parameter.kind in GGUF_F32_KINDS:
        return "F32"
    row = parameter.shape[-1]
    if parameter.kind == LM_HEAD or (parameter.kind == EMBEDDING and dims.tied):
        chosen = "Q8_0" if row % GGUF_TYPES[mix.base].block_size else mix.output_type
    else:
        site = LayerSite(parameter.layer, dims.layers, dims.heads // dims.kv_heads, dims.experts)
        chosen = _first_rule_type(parameter.kind, COMMON_RULES + mix.rules, site) or mix.base
        for promotion in PROMOTIONS:
            if (
                promotion.kind == parameter.kind
                and chosen in promotion.replaces
                and RULE_CONDITIONS[promotion.when](site)
            ):
                chosen = promotion.gguf_type
    return _type_for_row(chosen, row)


def _first_rule_type(kind: str, rules: Iterable[TypeRule], site: LayerSite) -> str | None:
    return next((rule.gguf_type for rule in rules if rule.kind == kind and RULE_CONDITIONS[rule.when](site)), None)


def _type_for_row(gguf_type: str, row: int) -> str:
    """``gguf_type`` if ``row`` is a multiple of its block, else llama.cpp's fallback, else F16."""
    if row % GGUF_TYPES[gguf_type].block_size == 0:
        return gguf_type
    fallback = GGUF_FALLBACKS.get(gguf_type)
    if fallback is not None and row % GGUF_TYPES[fallback].block_size == 0:
        return fallback
    return "F16"  # llama.cpp does so for K-quants, and refuses a legacy type outright


def gguf_tensor_bytes(gguf_type: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` stored in ``gguf_type`` (rows run along the last dimension)."""
    block = GGUF_TYPES[gguf_type]
    row = shape[-1]
    return math.prod(shape[:-1]) * (row // block.block_size) * block.block_bytes


# ---------------------------------------------------------------------------------------------
# Weights, KV cache, activations
# ---------------------------------------------------------------------------------------------


def is_gguf_name(format_name: str) -> bool:
    """Whether ``format_name`` names a llama.cpp mix (``gguf:...``) rather than a lowbit format."""
    return format_name.strip().lower().startswith(GGUF_PREFIX)


def canonical_format_name(format_name: str) -> str:
    """The name reports use: ``int4-g128`` as the registry spells it, GGUF mixes as ``gguf:Q4_K_M``."""
    if is_gguf_name(format_name):
        gguf_mix(format_name)
        return GGUF_PREFIX + format_name.strip().upper().removeprefix(GGUF_PREFIX.upper())
    return get_format(format_name).name


def weight_bytes(config_or_path: ConfigSource, format_name: str, *, keep_embeddings: bool = True) -> int:
    """Bytes of all the weights stored in ``format_name`` (a lowbit format or a ``gguf:`` mix).

    For lowbit formats, the decoder's linear layers take the format's exact storage size and
    the rest stays in 16 bits (fp32 in ``fp32``); ``keep_embeddings=False`` quantizes the
    embeddings and ``lm_head`` too. GGUF mixes decide every tensor, embeddings included, and
    ignore ``keep_embeddings``.
    """
    config = read_config(config_or_path)
    return _weight_bytes(config, parameter_shapes(config), format_name, keep_embeddings)


def _weight_bytes(config: dict[str, Any], shapes: list[ParameterShape], format_name: str, keep_embeddings: bool) -> int:
    if is_gguf_name(format_name):
        mix, dims = gguf_mix(format_name), Dimensions.of(config)
        by_type = Counter((_gguf_type(p, mix, dims), p.shape) for p in shapes)
        return sum(count * gguf_tensor_bytes(gguf_type, shape) for (gguf_type, shape), count in by_type.items())
    weight_format = get_format(format_name)
    quantized_kinds = QUANTIZED_KINDS if keep_embeddings else QUANTIZED_KINDS | {EMBEDDING, LM_HEAD}
    quantized = Counter(p.shape for p in shapes if p.kind in quantized_kinds)
    kept_values = sum(p.numel for p in shapes if p.kind not in quantized_kinds)
    kept_bytes = 4 if weight_format.name == "fp32" else HALF_BYTES
    return (
        sum(count * weight_format.storage_bytes(shape) for shape, count in quantized.items()) + kept_values * kept_bytes
    )


FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


def layer_types(config_or_path: ConfigSource) -> list[str]:
    """``full_attention`` or ``sliding_attention`` (or the config's own word) for every layer.

    From ``layer_types`` when the config lists them; otherwise a ``sliding_window`` (unless
    ``use_sliding_window`` is false) applies to every layer, to the layers from
    ``max_window_layers`` on (Qwen), or to all but every ``sliding_window_pattern``-th layer
    (Gemma2 alternates, Gemma3 has one full layer in six).
    """
    config = read_config(config_or_path)
    layers = config["num_hidden_layers"]
    if config.get("layer_types"):
        if len(config["layer_types"]) != layers:
            raise LowbitError(f"the config lists {len(config['layer_types'])} layer_types for {layers} layers.")
        return list(config["layer_types"])
    if not config.get("sliding_window") or config.get("use_sliding_window") is False:
        return [FULL_ATTENTION] * layers
    layout = FAMILY_LAYOUTS.get(config.get("model_type"), LLAMA_LAYOUT)
    pattern = config.get("sliding_window_pattern") or layout.sliding_window_pattern
    if pattern:
        return [FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION for i in range(layers)]
    first_sliding = config.get("max_window_layers") or 0
    return [SLIDING_ATTENTION if i >= first_sliding else FULL_ATTENTION for i in range(layers)]


def attention_spans(config_or_path: ConfigSource, context: int) -> list[int]:
    """Tokens each layer's KV cache holds at ``context``: all of them, or at most the window."""
    config = read_config(config_or_path)
    _check_positive("context", context)
    window = config.get("sliding_window") or context
    return [min(context, window) if kind == SLIDING_ATTENTION else context for kind in layer_types(config)]


def kv_cache_bytes(config_or_path: ConfigSource, context: int, batch: int = 1, dtype_bytes: int = HALF_BYTES) -> int:
    """Bytes of the KV cache: 2 (K and V) x kv_heads x head_dim x tokens held x batch x bytes, per layer.

    ``num_key_value_heads`` makes it GQA aware; sliding-window layers hold at most their window.
    """
    config = read_config(config_or_path)
    _check_positive("batch", batch)
    dims = Dimensions.of(config)
    per_token = 2 * dims.kv_heads * dims.head_dim * dtype_bytes
    return per_token * batch * sum(attention_spans(config, context))


def activation_bytes(config_or_path: ConfigSource, context: int, batch: int = 1) -> int:
    """Peak activations of one forward over ``batch x context`` tokens (see the module docstring)."""
    config = read_config(config_or_path)
    _check_positive("context", context)
    _check_positive("batch", batch)
    dims = Dimensions.of(config)
    per_token = (2 * dims.hidden + 3 * dims.mlp_width) * HALF_BYTES
    return batch * context * per_token + batch * dims.vocab * 4


def _check_positive(name: str, value: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise LowbitError(f"{name} must be a positive whole number, got {value!r}.")


# ---------------------------------------------------------------------------------------------
# Memory amounts
# ---------------------------------------------------------------------------------------------

MEMORY_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": GB, "gb": GB, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": GiB, "tib": 2**40,
}  # fmt: skip
MEMORY_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
MEMORY_FORMS = (
    "a number with a unit: 24GB, 80G or 24000MB (decimal: GB = 10^9 bytes), 24GiB (binary: "
    "GiB = 2^30 bytes), or a plain number of bytes"
)
#: No GPU has less; a smaller amount is a mistake, most likely a forgotten unit ("24" meaning 24 GB).
SMALLEST_MEMORY_BYTES = 2**20


def parse_memory(text: str | int) -> int:
    """Bytes in ``"24GB"``, ``"24 GiB"``, ``"80G"``, ``"24000MB"`` or ``"25769803776"``.

    Decimal units (K, M, G, T with or without B) are powers of 1000; KiB, MiB, GiB, TiB are
    powers of 1024. A plain number is bytes. Less than 1 MiB is refused, so that a forgotten
    unit is not read as a few bytes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = MEMORY_PATTERN.match(str(text))
        if not match or match.group(2).lower() not in MEMORY_UNITS:
            raise LowbitError(f"cannot read {text!r} as an amount of memory. Write {MEMORY_FORMS}.")
        size = round(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])
    if size < SMALLEST_MEMORY_BYTES:
        raise LowbitError(f"{text!r} reads as {size} bytes, less than any GPU has. Write {MEMORY_FORMS}.")
    return size


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

LOWBIT_FORMATS = (
    "fp32", "bf16", "fp16", "fp8", "int8", "int4-g32", "int4-g128", "nf4", "nf4-dq", "mxfp4", "int3-g128", "int2-g64",
)  # fmt: skip
#: Formats a report covers unless told otherwise: lowbit's, then llama.cpp's mixes.
DEFAULT_FORMATS = LOWBIT_FORMATS + tuple(GGUF_PREFIX + mix for mix in GGUF_MIXES)


def size_report(
    config_or_path: ConfigSource,
    *,
    context: int = 4096,
    batch: int = 1,
    gpu_memory: str | int | None = None,
    formats: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Memory the model needs in each format, from its config alone; JSON-serializable.

    Keys: ``model`` (name, architecture, model_type), ``parameters``, ``context``, ``batch``,
    ``weights`` and ``bits_per_weight`` (per format, bits averaged over every parameter),
    ``kv_cache_bytes``, ``activation_bytes``, ``overhead_bytes``, ``total_bytes`` (per format:
    weights + KV cache + activations + overhead), with ``gpu_memory`` also ``gpu_memory_bytes``
    and ``fits`` (per format), then ``assumptions`` (how everything is counted) and ``notes``
    (what is particular to this model).
    """
    raw = _raw_config(config_or_path)
    config = _language_model_config(raw)
    shapes = parameter_shapes(config)
    requested = [formats] if isinstance(formats, str) else formats or DEFAULT_FORMATS
    names = list(dict.fromkeys(canonical_format_name(name) for name in requested))
    parameters = sum(p.numel for p in shapes)
    weights = {name: _weight_bytes(config, shapes, name, keep_embeddings=True) for name in names}
    kv_cache = kv_cache_bytes(config, context, batch)
    activations = activation_bytes(config, context, batch)
    report: dict[str, Any] = {
        "model": _model_identity(raw, config),
        "parameters": parameters,
        "context": context,
        "batch": batch,
        "weights": weights,
        "bits_per_weight": {name: round(8 * size / parameters, 4) for name, size in weights.items()},
        "kv_cache_bytes": kv_cache,
        "activation_bytes": activations,
        "overhead_bytes": RUNTIME_OVERHEAD_BYTES,
        "total_bytes": {name: size + kv_cache + activations + RUNTIME_OVERHEAD_BYTES for name, size in weights.items()},
    }
    if gpu_memory is not None:
        memory = parse_memory(gpu_memory)
        report["gpu_memory_bytes"] = memory
        report["fits"] = {name: total <= memory for name, total in report["total_bytes"].items()}
    report["assumptions"] = dict(ASSUMPTIONS)
    report["notes"] = _notes(raw, config, shapes, context)
    return report


def _model_identity(raw: dict[str, Any], config: dict[str, Any]) -> dict[str, str | None]:
    architectures = raw.get("architectures") or config.get("architectures") or [None]
    model_type = config.get("model_type") or raw.get("model_type")
    source = raw.get("_name_or_path")
    name = Path(source).name.removesuffix(".json") if source else architectures[0] or model_type or "model"
    return {"name": name, "architecture": architectures[0], "model_type": model_type}


def _notes(raw: dict[str, Any], config: dict[str, Any], shapes: list[ParameterShape], context: int) -> list[str]:
    """What the reader of this model's figures should know beyond the general assumptions."""
    notes = []
    if isinstance(raw.get("text_config"), dict):
        notes.append(
            f"multimodal config ({raw.get('model_type')}): sized its text_config only; the vision or "
            "audio tower is not counted."
        )
    model_type = config.get("model_type")
    if model_type not in FAMILY_LAYOUTS:
        notes.append(f"model_type {model_type!r} is not in lowbit's layout table; the Llama layout was assumed.")
    notes += _sliding_window_notes(config, context)
    notes += _gguf_row_notes(shapes)
    quantization = raw.get("quantization_config")
    if isinstance(quantization, dict):
        notes.append(
            f"the config carries a quantization_config ({quantization.get('quant_method', 'unknown method')}): "
            "the figures are for this architecture in each format, not the size of that checkpoint's files."
        )
    return notes


def _sliding_window_notes(config: dict[str, Any], context: int) -> list[str]:
    kinds = Counter(layer_types(config))
    notes = []
    window = config.get("sliding_window")
    if kinds[SLIDING_ATTENTION] and window:
        capped = " (it caps the KV cache at this context)" if window < context else ""
        notes.append(
            f"{kinds[SLIDING_ATTENTION]} of {config['num_hidden_layers']} layers use a sliding window of "
            f"{window} tokens{capped}; a runtime that keeps the full cache for them needs more."
        )
    elif kinds[SLIDING_ATTENTION]:
        notes.append("layer_types names sliding layers but the config gives no sliding_window: counted as full.")
    others = sorted(set(kinds) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if others:
        notes.append(f"layer types {', '.join(others)} are counted as full attention, an upper bound.")
    return notes


def _gguf_row_notes(shapes: list[ParameterShape]) -> list[str]:
    """Which row lengths do not fill whole GGUF blocks, and what llama.cpp does about it."""
    rows = sorted({p.shape[-1] for p in shapes if len(p.shape) == 2 and p.kind not in GGUF_F32_KINDS})
    k_block, legacy_block = GGUF_TYPES["Q4_K"].block_size, GGUF_TYPES["Q4_0"].block_size
    partial_k_rows = [str(row) for row in rows if row % k_block]
    partial_legacy_rows = [str(row) for row in rows if row % legacy_block]
    fallbacks = "; ".join(f"{k_quant} -> {fallback}" for k_quant, fallback in GGUF_FALLBACKS.items())
    notes = []
    if partial_k_rows:
        notes.append(
            f"rows of {', '.join(partial_k_rows)} values are not a multiple of {k_block}: GGUF K-quant mixes "
            f"store those tensors in llama.cpp's fallback types ({fallbacks})."
        )
    if partial_legacy_rows:
        notes.append(
            f"rows of {', '.join(partial_legacy_rows)} values are not a multiple of {legacy_block}: llama.cpp "
            "keeps those tensors in F16 for K-quant mixes and refuses Q4_0 … Q8_0; they are counted as F16."
        )
    return notes


def format_report(report: dict[str, Any]) -> str:
    """A table of ``size_report``'s figures for a terminal: one row per format, sizes in GB."""
    model, kv_cache, fits = report["model"], report["kv_cache_bytes"], report.get("fits")
    architecture = model["architecture"]
    title = model["name"] if architecture in (None, model["name"]) else f"{model['name']} ({architecture})"
    lines = [
        f"{title}: {report['parameters'] / 1e9:.2f} billion parameters",
        f"context {report['context']} x batch {report['batch']}: KV cache {_gb(kv_cache)} GB, "
        + f"activations {_gb(report['activation_bytes'])} GB, overhead {_gb(report['overhead_bytes'])} GB",
    ]
    if fits is not None:
        memory = report["gpu_memory_bytes"]
        lines.append(f"GPU memory: {_gb(memory)} GB ({memory / GiB:.2f} GiB)")
    header = f"{'format':<14} {'bits/weight':>11} {'weights GB':>11} {'weights+KV GB':>14} {'total GB':>9}"
    header += "  fits" if fits is not None else ""
    lines += ["", header, "-" * len(header)]
    for name, size in report["weights"].items():
        row = (
            f"{name:<14} {report['bits_per_weight'][name]:>11.2f} {_gb(size):>11} "
            + f"{_gb(size + kv_cache):>14} {_gb(report['total_bytes'][name]):>9}"
        )
        lines.append(row + (f"  {'yes' if fits[name] else 'no'}" if fits is not None else ""))
    lines += [
        "",
        "total = weights + KV cache + activations + overhead. GB = 10^9 bytes.",
        "lowbit formats keep embeddings and lm_head in bf16; the JSON report lists every assumption.",
    ]
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def _gb(size: int) -> str:
    return f"{size / GB:.2f}"
