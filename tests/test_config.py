"""The one config reader: dicts, config.json files and model directories; the language model of a
multimodal config; transformers configs that build the same model; clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lowbit.config import load_config, read_config, read_raw_config
from lowbit.errors import LowbitError

SMOLLM2 = Path(__file__).parent / "data" / "configs" / "SmolLM2-135M"
TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "intermediate_size": 96,
}


def shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_read_config_from_dict_file_and_directory():
    from_directory = read_config(SMOLLM2)
    from_file = read_config(SMOLLM2 / "config.json")
    from_dict = read_config(json.loads((SMOLLM2 / "config.json").read_text()))
    assert from_directory == from_file
    assert from_directory["_name_or_path"] == str(SMOLLM2)
    assert {k: v for k, v in from_directory.items() if k != "_name_or_path"} == from_dict
    original = dict(TINY)
    read_config(original)["hidden_size"] = 1
    assert original == TINY  # a copy, never the caller's dict


def test_read_raw_config_keeps_the_multimodal_parent():
    outer = {"model_type": "gemma3", "vocab_size": 100, "text_config": dict(TINY, model_type="gemma3_text")}
    del outer["text_config"]["vocab_size"]
    assert read_raw_config(outer) == outer
    assert read_config(outer)["vocab_size"] == 100  # inherited by the text_config


@pytest.mark.parametrize("source", [SMOLLM2, SMOLLM2 / "config.json"])
def test_load_config_builds_what_auto_config_builds(source):
    expected = AutoConfig.for_model(**json.loads((SMOLLM2 / "config.json").read_text()))
    config = load_config(source)
    assert type(config) is type(expected)
    assert shapes(config) == shapes(expected)


def test_load_config_leaves_out_the_manifest_and_accepts_other_field_names():
    config = load_config(dict(TINY, quantization_config={"quant_method": "lowbit", "modules": {}}))
    assert getattr(config, "quantization_config", None) is None
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100}  # attribute_map names
    assert load_config(gpt2).hidden_size == 64


def test_load_config_of_a_multimodal_model():
    outer = {
        "model_type": "gemma3",
        "text_config": dict(TINY, model_type="gemma3_text", head_dim=16),
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 16},
    }  # fmt: skip
    config = load_config(outer)
    assert config.model_type == "gemma3" and config.get_text_config().hidden_size == 64
    broken = dict(outer, text_config=dict(outer["text_config"], hidden_size="64"))
    with pytest.raises(LowbitError, match="hidden_size must be a positive integer"):
        load_config(broken)


@pytest.mark.parametrize(
    "config, message",
    [
        ({k: v for k, v in TINY.items() if k != "model_type"}, "no model_type"),
        (dict(TINY, model_type="no-such-family"), "'no-such-family' is unknown to transformers"),
        ({k: v for k, v in TINY.items() if k != "hidden_size"}, "the config has no hidden_size"),
        (dict(TINY, hidden_size="64"), "hidden_size must be a positive integer"),
        (dict(TINY, num_key_value_heads=0), "num_key_value_heads must be a positive integer"),
        (dict(TINY, vocab_size=True), "vocab_size must be a positive integer"),
        ({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "vocab_size": 100}, "the config has no n_layer"),
        (dict(TINY, hidden_size=66), "not a multiple of num_attention_heads"),
    ],
)
def test_load_config_refuses_with_a_clear_error(config, message):
    with pytest.raises(LowbitError, match=message):
        load_config(config)


def test_unreadable_sources(tmp_path):
    with pytest.raises(LowbitError, match="expected a config dict"):
        read_config(42)
    with pytest.raises(LowbitError, match="does not exist"):
        load_config(tmp_path / "missing")
    (tmp_path / "config.json").write_bytes(b"\xff\xfe not text")
    with pytest.raises(LowbitError, match="not valid JSON"):
        load_config(tmp_path)
