"""The sizing advisor: parameter shapes against real transformers models, the familiar Llama-3
figures, exact format sizes, GGUF mixes against llama.cpp's rules and file sizes, KV cache,
memory strings and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from lowbit.advisor.sizing import (
    DEFAULT_FORMATS,
    GGUF_TYPES,
    format_report,
    gguf_tensor_bytes,
    gguf_tensor_types,
    kv_cache_bytes,
    layer_types,
    parameter_count,
    parameter_shapes,
    parse_memory,
    read_config,
    size_report,
    use_more_bits,
    weight_bytes,
)
from lowbit.arch import KNOWN_ARCHITECTURES
from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.formats.gguf_types import GGML_TYPES, TENSOR_TYPE_FALLBACK

CONFIGS = Path(__file__).parent / "data" / "configs"
LLAMA3_8B = CONFIGS / "Meta-Llama-3-8B"
LLAMA3_70B = CONFIGS / "Meta-Llama-3-70B"
SMOLLM2 = CONFIGS / "SmolLM2-135M"
GB, GiB = 10**9, 2**30

TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "intermediate_size": 96,
}


def real_model(config: dict) -> torch.nn.Module:
    """The transformers model for ``config``, on the meta device: real shapes, no memory."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))


def embedding_parameters(path: Path) -> int:
    return sum(p.numel for p in parameter_shapes(path) if p.kind in ("embedding", "lm_head"))


# -- parameter shapes ---------------------------------------------------------------------


def test_llama3_parameter_counts():
    assert parameter_count(LLAMA3_8B) == 8_030_261_248
    assert parameter_count(LLAMA3_70B) == 70_553_706_496


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("llama", {"tie_word_embeddings": False}),
        ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
        ("qwen2", {}),  # q/k/v biases the config does not mention
        ("qwen3", {"head_dim": 32}),  # head_dim != hidden / heads, q/k norms
        ("gemma2", {"head_dim": 32}),  # four norms per layer, tied by default
        ("gemma3_text", {"head_dim": 32}),
    ],
)
def test_shapes_match_real_transformers_model(model_type, extra):
    config = dict(TINY, model_type=model_type, **extra)
    real = {name: tuple(p.shape) for name, p in real_model(config).named_parameters()}
    assert {p.name: p.shape for p in parameter_shapes(config)} == real


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
        (
            "qwen2_moe",
            {
                "num_experts": 4,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 48,
                "mlp_only_layers": [1],
            },
        ),
        ("qwen3_moe", {"num_experts": 4, "moe_intermediate_size": 32, "decoder_sparse_step": 2}),
    ],
)
def test_moe_parameter_count_matches_real_transformers_model(model_type, extra):
    # transformers stores the experts of a layer fused in 3-D tensors, so only the counts compare
    config = dict(TINY, model_type=model_type, **extra)
    assert parameter_count(config) == sum(p.numel() for p in real_model(config).parameters())


DENSE_EXTRA = {"phi3": {"pad_token_id": 0}}


@pytest.mark.parametrize("model_type", [t for t in KNOWN_ARCHITECTURES if not t.endswith("moe") and t != "mixtral"])
def test_parameter_count_of_every_dense_family_in_the_table(model_type):
    # phi3 fuses q/k/v and gate/up: the names differ from the Llama layout, the counts do not.
    # No head_dim: Qwen3 and Gemma default to 128 and 256, not hidden / heads.
    config = dict(TINY, model_type=model_type, **DENSE_EXTRA.get(model_type, {}))
    assert parameter_count(config) == sum(p.numel() for p in real_model(config).parameters())


def test_sizing_refuses_what_it_cannot_model():
    no_width = {k: v for k, v in TINY.items() if k != "intermediate_size"}
    with pytest.raises(LowbitError, match="intermediate_size"):
        parameter_count(no_width)
    with pytest.raises(LowbitError, match="multi-head latent attention"):
        size_report(dict(TINY, kv_lora_rank=512))


def int4_bytes_of_real_model(config: dict) -> int:
    """int4-g128 bytes counted on the real transformers model: its decoder linears quantized, the rest bf16."""
    model = real_model(config)
    int4 = get_format("int4-g128")
    linears = [m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    kept = sum(p.numel() for p in model.parameters()) - sum(w.numel() for w in linears)
    return sum(int4.storage_bytes(tuple(w.shape)) for w in linears) + 2 * kept


def test_weight_bytes_of_tiny_model_count_its_real_modules():
    config = dict(TINY, model_type="llama", tie_word_embeddings=True)
    parameters = sum(p.numel() for p in real_model(config).parameters())  # the tied lm_head counted once
    assert parameter_count(config) == parameters
    assert weight_bytes(config, "bf16") == 2 * parameters
    assert weight_bytes(config, "fp32") == 4 * parameters
    assert weight_bytes(config, "int4-g128") == int4_bytes_of_real_model(config)


@pytest.mark.parametrize("scheme", ["int8", "int4-g128", "nf4-dq", "int3-g64"])
def test_size_reports_the_bits_per_weight_that_eval_measures(scheme):
    """One meaning of bits/weight: ``size`` (from the config) and eval (on the quantized model) agree."""
    import lowbit
    from lowbit.eval import bits_per_weight

    config = dict(TINY, model_type="llama", hidden_size=96, intermediate_size=200)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    measured = bits_per_weight(lowbit.quantize(model, scheme))
    assert size_report(config, formats=[scheme])["bits_per_weight"][scheme] == pytest.approx(measured, abs=1e-4)


def test_gqa_shapes_and_explicit_head_dim():
    shapes = {p.name: p.shape for p in parameter_shapes(dict(TINY, head_dim=32))}
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4 * 32, 64)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (2 * 32, 64)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (64, 4 * 32)


# -- the familiar figures ------------------------------------------------------------------


def test_llama3_70b_float_figures():
    parameters = parameter_count(LLAMA3_70B)
    assert weight_bytes(LLAMA3_70B, "fp32") == 4 * parameters  # 282.2 GB
    assert weight_bytes(LLAMA3_70B, "bf16") == weight_bytes(LLAMA3_70B, "fp16") == 2 * parameters  # 141.1 GB
    assert 282 * GB < weight_bytes(LLAMA3_70B, "fp32") < 283 * GB
    assert 141 * GB < weight_bytes(LLAMA3_70B, "bf16") < 142 * GB


def test_llama3_70b_quantized_figures_when_everything_is_quantized():
    # "70 GB in INT8, 35-40 GB at 4 bits with scales" counts every parameter at the format's size
    def everything(name: str) -> int:
        return weight_bytes(LLAMA3_70B, name, keep_embeddings=False)

    assert 70 * GB < everything("int8") < 72 * GB
    for name in ("int4-g128", "nf4", "nf4-dq"):
        assert 35 * GB < everything(name) < 40 * GB, name


def test_llama3_70b_quantized_figures_with_16_bit_embeddings():
    # lowbit keeps embed_tokens and the untied lm_head (2 x 1.05 B parameters) in bf16 by default
    embedding_matrix = (128256, 8192)
    for name in ("int8", "int4-g128", "nf4", "nf4-dq"):
        as_bf16 = 2 * 2 * math.prod(embedding_matrix)
        as_format = 2 * get_format(name).storage_bytes(embedding_matrix)
        extra = weight_bytes(LLAMA3_70B, name) - weight_bytes(LLAMA3_70B, name, keep_embeddings=False)
        assert extra == as_bf16 - as_format
    assert 72 * GB < weight_bytes(LLAMA3_70B, "int8") < 73 * GB
    assert 35 * GB < weight_bytes(LLAMA3_70B, "int4-g128") < 40 * GB
    assert 35 * GB < weight_bytes(LLAMA3_70B, "nf4-dq") < 40 * GB
    assert 40 * GB < weight_bytes(LLAMA3_70B, "nf4") < 43 * GB  # 4.5 bits: blocks of 64 with fp32 scales


def test_double_quant_saves_about_0_373_bits_per_quantized_weight():
    quantized = parameter_count(LLAMA3_8B) - embedding_parameters(LLAMA3_8B)
    saved_bits = 8 * (weight_bytes(LLAMA3_8B, "nf4") - weight_bytes(LLAMA3_8B, "nf4-dq")) / quantized
    assert saved_bits == pytest.approx((32 - 8 - 32 / 256) / 64, abs=1e-3)


def test_partial_groups_are_counted_exactly():
    # SmolLM2-135M: hidden 576 = 4.5 groups of 128, so every q/k/v/o/gate/up row ends in a partial group
    int4 = get_format("int4-g128")
    assert int4.storage_bytes((576, 576)) == 576 * (288 + 5 * 2) + 576 * 3  # codes, 5 fp16 scales, 5 packed zeros
    assert weight_bytes(SMOLLM2, "int4-g128") == int4_bytes_of_real_model(read_config(SMOLLM2))
    assert parameter_count(SMOLLM2) == 134_515_008  # tied embeddings counted once


def test_smollm2_matches_its_real_model():
    config = read_config(SMOLLM2)
    real = {name: tuple(p.shape) for name, p in real_model(config).named_parameters()}
    assert {p.name: p.shape for p in parameter_shapes(config)} == real


# -- GGUF ------------------------------------------------------------------------------------


def test_gguf_block_geometry():
    bits = {name: round(gguf_type.bits_per_weight, 4) for name, gguf_type in GGUF_TYPES.items()}
    assert bits == {
        "F32": 32, "F16": 16, "Q4_0": 4.5, "Q4_1": 5, "Q5_0": 5.5, "Q5_1": 6, "Q8_0": 8.5,
        "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625,
    }  # fmt: skip
    assert gguf_tensor_bytes("Q4_K", (4096, 4096)) == 4096 * 16 * 144


def test_ggml_type_table_matches_gguf_py():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, ggml_type in GGML_TYPES.items():
        assert GGMLQuantizationType[name].value == ggml_type.type_id, name
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (ggml_type.block_size, ggml_type.block_bytes), name
    for needed in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS"):
        assert needed in GGML_TYPES
    assert {f"Q{bits}_K" for bits in range(2, 7)} <= set(GGML_TYPES)
    for quant, fallback in TENSOR_TYPE_FALLBACK.items():  # a fallback holds the rows its type cannot: blocks of 32
        assert GGML_TYPES[quant].block_size == 256 and GGML_TYPES[fallback].block_size == 32
    assert all(GGUF_TYPES[name] is GGML_TYPES[name] for name in GGUF_TYPES)


def test_gguf_q4_k_m_picks_types_as_llama_cpp_does():
    types = dict(gguf_tensor_types(LLAMA3_8B, "gguf:Q4_K_M"))
    more_bits = [layer for layer in range(32) if use_more_bits(layer, 32)]
    assert more_bits == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    for layer in range(32):
        expected = "Q6_K" if layer in more_bits else "Q4_K"
        assert types[f"model.layers.{layer}.self_attn.v_proj.weight"] == expected
        assert types[f"model.layers.{layer}.mlp.down_proj.weight"] == expected
        assert types[f"model.layers.{layer}.self_attn.q_proj.weight"] == "Q4_K"
        assert types[f"model.layers.{layer}.input_layernorm.weight"] == "F32"
    assert types["lm_head.weight"] == "Q6_K"
    assert types["model.embed_tokens.weight"] == "Q4_K"


def test_gguf_70b_gets_q5_k_attn_v():
    types = dict(gguf_tensor_types(LLAMA3_70B, "gguf:Q4_K_M"))
    assert types["model.layers.0.self_attn.v_proj.weight"] == "Q6_K"  # use_more_bits
    assert types["model.layers.11.self_attn.v_proj.weight"] == "Q5_K"  # Q4_K promoted: 80 layers with GQA


def test_gguf_fallback_for_rows_not_a_multiple_of_256():
    types = dict(gguf_tensor_types(SMOLLM2, "gguf:Q4_K_M"))
    assert types["model.layers.5.self_attn.q_proj.weight"] == "Q5_0"  # Q4_K on rows of 576
    assert types["model.layers.0.self_attn.v_proj.weight"] == "Q8_0"  # Q6_K on rows of 576
    assert types["model.layers.4.mlp.down_proj.weight"] == "Q4_K"  # rows of 1536 = 6 x 256
    assert types["model.embed_tokens.weight"] == "Q8_0"  # tied: the output rule, rows of 576
    assert any("not a multiple of 256" in note for note in size_report(SMOLLM2)["notes"])


# Sizes of the published .gguf files of Meta-Llama-3-8B(-Instruct) as the Hub lists them (GB);
# a file holds ~7 MB of metadata and tokenizer beyond the tensor data counted here.
PUBLISHED_LLAMA3_8B_GGUF_GB = {
    "Q8_0": 8.54, "Q6_K": 6.60, "Q5_K_M": 5.73, "Q4_K_M": 4.92, "Q4_0": 4.66, "Q3_K_M": 4.02, "Q2_K": 3.18,
}  # fmt: skip


@pytest.mark.parametrize("mix, published", PUBLISHED_LLAMA3_8B_GGUF_GB.items())
def test_gguf_mixes_match_published_file_sizes(mix, published):
    tensors = weight_bytes(LLAMA3_8B, f"gguf:{mix}") / GB
    assert 0 <= published - tensors <= 0.02


# -- KV cache ----------------------------------------------------------------------------------


def test_kv_cache_llama3_8b_is_one_gib_at_8192():
    assert kv_cache_bytes(LLAMA3_8B, context=8192, batch=1) == 2 * 32 * 8 * 128 * 8192 * 2 == GiB
    assert kv_cache_bytes(LLAMA3_8B, context=8192, batch=4) == 4 * GiB
    assert kv_cache_bytes(LLAMA3_8B, context=8192, batch=1, dtype_bytes=1) == GiB // 2


def test_kv_cache_is_gqa_aware():
    config = read_config(LLAMA3_8B)
    multi_head = dict(config, num_key_value_heads=config["num_attention_heads"])
    assert kv_cache_bytes(multi_head, 8192, 1) == 4 * kv_cache_bytes(config, 8192, 1)  # 32 heads share 8 KV heads


def test_sliding_window_caps_the_kv_cache():
    mistral = dict(read_config(LLAMA3_8B), model_type="mistral", vocab_size=32000, sliding_window=4096)
    full = kv_cache_bytes(LLAMA3_8B, 8192, 1)
    assert kv_cache_bytes(mistral, 8192, 1) == full // 2
    assert kv_cache_bytes(mistral, 2048, 1) == kv_cache_bytes(LLAMA3_8B, 2048, 1)
    assert any("sliding window of 4096" in note for note in size_report(mistral, context=8192)["notes"])
    disabled = dict(mistral, use_sliding_window=False)  # Qwen2 configs carry a window they do not use
    assert kv_cache_bytes(disabled, 8192, 1) == full


def test_alternating_sliding_layers():
    gemma2 = dict(TINY, model_type="gemma2", head_dim=16, sliding_window=100)
    assert layer_types(gemma2) == ["sliding_attention", "full_attention"] * 2
    listed = dict(TINY, sliding_window=100, layer_types=["full_attention", "sliding_attention"] * 2)
    per_token_per_layer = 2 * 2 * 16 * 2  # K and V x kv heads x head_dim x bytes
    assert kv_cache_bytes(gemma2, 1000, 1) == per_token_per_layer * (100 + 1000 + 100 + 1000)
    assert kv_cache_bytes(listed, 1000, 1) == per_token_per_layer * (1000 + 100 + 1000 + 100)


# -- the report ------------------------------------------------------------------------------------


def test_size_report_keys_and_fit():
    report = size_report(LLAMA3_8B, context=4096, batch=1, gpu_memory="24GB")
    assert set(report) == {
        "model", "parameters", "context", "batch", "weights", "bits_per_weight", "bits_per_parameter", "kv_cache_bytes",
        "activation_bytes", "overhead_bytes", "total_bytes", "gpu_memory_bytes", "fits", "assumptions", "notes",
    }  # fmt: skip
    json.dumps(report)
    assert report["model"] == {"name": "Meta-Llama-3-8B", "architecture": "LlamaForCausalLM", "model_type": "llama"}
    assert list(report["weights"]) == list(DEFAULT_FORMATS)
    for name in ("fp32", "bf16", "fp16", "fp8", "int8", "int4-g128", "int4-g32", "nf4", "nf4-dq", "int3-g128",
                 "int2-g64", "mxfp4", "gguf:Q4_K_M", "gguf:Q8_0", "gguf:Q2_K"):  # fmt: skip
        assert name in report["weights"]
    assert report["bits_per_weight"]["bf16"] == report["bits_per_parameter"]["bf16"] == 16
    assert report["bits_per_weight"]["int4-g128"] == pytest.approx(4 + 20 / 128, abs=1e-4)  # fp16 scale, 4-bit zero per 128
    assert report["bits_per_parameter"]["int4-g128"] > report["bits_per_weight"]["int4-g128"]  # 16-bit embeddings
    assert report["kv_cache_bytes"] == GiB // 2
    for name, weights in report["weights"].items():
        total = weights + report["kv_cache_bytes"] + report["activation_bytes"] + report["overhead_bytes"]
        assert report["total_bytes"][name] == total
        assert report["fits"][name] == (total <= 24 * GB)
    assert report["fits"]["bf16"] and not report["fits"]["fp32"]


def test_size_report_70b_on_48gb():
    report = size_report(LLAMA3_70B, gpu_memory="48GB", formats=["bf16", "int4-g128", "gguf:q4_k_m"])
    assert report["fits"] == {"bf16": False, "int4-g128": True, "gguf:Q4_K_M": True}
    assert "gpu_memory_bytes" not in size_report(LLAMA3_70B, formats="nf4")


def test_format_report_lists_every_format():
    text = format_report(size_report(LLAMA3_8B, gpu_memory="24GiB"))
    assert "Meta-Llama-3-8B (LlamaForCausalLM): 8.03 billion parameters" in text
    for name in DEFAULT_FORMATS:
        assert f"\n{name} " in text
    assert " yes" in text and " no" in text


def test_multimodal_config_uses_text_config():
    outer = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": dict(TINY, model_type="gemma3_text", head_dim=16),
        "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"},
    }
    assert read_config(outer)["model_type"] == "gemma3_text"
    report = size_report(outer)
    assert report["parameters"] == parameter_count(dict(TINY, model_type="gemma3_text", head_dim=16))
    assert any("text_config" in note for note in report["notes"])


# -- input errors ----------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(LowbitError, match="does not exist"):
        read_config(tmp_path / "nowhere")


def test_directory_without_config(tmp_path):
    with pytest.raises(LowbitError, match="without a config.json"):
        size_report(tmp_path)


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(LowbitError, match="not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(LowbitError, match="JSON object"):
        read_config(tmp_path)


def test_config_lacking_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 512, "vocab_size": 32128}))
    with pytest.raises(LowbitError, match="hidden_size, num_hidden_layers, num_attention_heads"):
        read_config(tmp_path / "config.json")
    with pytest.raises(LowbitError, match="positive integer"):
        read_config(dict(TINY, hidden_size="64"))


def test_bad_format_and_context():
    with pytest.raises(LowbitError, match="unknown format"):
        size_report(LLAMA3_8B, formats=["int9"])
    with pytest.raises(LowbitError, match="unknown GGUF mix"):
        weight_bytes(LLAMA3_8B, "gguf:Q4_K_X")
    with pytest.raises(LowbitError, match="context"):
        kv_cache_bytes(LLAMA3_8B, context=0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GB", 24 * GB), ("24 GiB", 24 * GiB), ("80G", 80 * GB), ("24000MB", 24 * GB), ("1.5 TB", 1500 * GB),
        ("512mib", 512 * 2**20), ("25769803776", 24 * GiB), (24 * GiB, 24 * GiB),
    ],
)  # fmt: skip
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "24 XB", "-5GB", "GB", "24", "24 G B", "0GB", -1])
def test_parse_memory_rejects(text):
    with pytest.raises(LowbitError, match="GiB"):
        parse_memory(text)


def test_a_context_beyond_the_model_maximum_is_noted():
    config = json.loads((LLAMA3_8B / "config.json").read_text())
    longest = config["max_position_embeddings"]
    within = size_report(config, context=longest)
    beyond = size_report(config, context=longest + 1)
    assert not any("beyond this model's maximum" in note for note in within["notes"])
    assert any(f"{longest + 1:,} tokens is beyond this model's maximum of {longest:,}" in note for note in beyond["notes"])
