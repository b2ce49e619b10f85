"""The one reader of a model's ``config.json``.

``read_config`` gives the language model's config as a dict (what the sizing advisor and the
architecture table read); ``load_config`` gives the ``transformers.PretrainedConfig`` a model
is built from. Both take a dict, a ``config.json`` path or a model directory (a Hugging Face
or lowbit checkpoint), and both refuse what cannot be a decoder-only language model's config
with a :class:`LowbitError` that says what is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ConfigSource = Mapping[str, Any] | str | os.PathLike

#: Fields every decoder-only transformer's config has (under these names or, for families that
#: name them differently, under the names of the config class's ``attribute_map``).
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
#: Fields that, when present, are sizes: positive whole numbers.
SIZE_FIELDS = (*REQUIRED_FIELDS, "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size")
#: Fields a multimodal ``text_config`` may leave to its parent config.
INHERITED_FIELDS = ("vocab_size", "tie_word_embeddings", "architectures", "_name_or_path")
#: Keys of a config.json that are not part of the architecture: where it came from, and a
#: checkpoint's quantization manifest (read it from :func:`read_raw_config`).
NOT_ARCHITECTURE = ("_name_or_path", "quantization_config")


def read_config(config_or_path: ConfigSource) -> dict[str, Any]:
    """The config of the language model, as a dict: from a dict, a ``config.json``, or a
    directory holding one.

    A multimodal config's ``text_config`` is the language model, and is what is returned (fields
    it leaves to its parent, such as ``vocab_size``, are taken from there). The fields are
    checked: present, and sizes positive whole numbers.
    """
    return language_model_config(read_raw_config(config_or_path))


def read_raw_config(config_or_path: ConfigSource) -> dict[str, Any]:
    """The config as given (a copy of the dict, or the parsed file), unchecked; a file's config
    gets ``_name_or_path``, the model's directory."""
    if isinstance(config_or_path, Mapping):
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
    except OSError as error:
        raise LowbitError(f"cannot read {file}: {error.strerror}") from None
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


def language_model_config(raw: Mapping[str, Any], attribute_map: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``raw`` itself, or its ``text_config`` with the fields it inherits; checked.

    ``attribute_map`` (a transformers config class's) says under which key a family keeps a
    standard field (GPT-2: ``hidden_size`` is ``n_embd``).
    """
    config = dict(raw)
    if isinstance(raw.get("text_config"), Mapping):
        inherited = {field: raw[field] for field in INHERITED_FIELDS if field in raw}
        config = {**inherited, **raw["text_config"]}
    _check_fields(config, attribute_map or {})
    return config


def _check_fields(config: dict[str, Any], attribute_map: Mapping[str, str]) -> None:
    def key(field: str) -> str:
        return attribute_map.get(field, field)

    missing = [key(field) for field in REQUIRED_FIELDS if key(field) not in config]
    if missing:
        raise LowbitError(
            f"the config has no {', '.join(missing)}. lowbit reads hidden_size, num_hidden_layers, "
            "num_attention_heads and vocab_size, the fields of a decoder-only transformer's config.json "
            "(Llama, Mistral, Qwen, Gemma, Phi-3 …); encoder-decoder configs name them differently and "
            "are not supported."
        )
    for field in SIZE_FIELDS:
        value = config.get(key(field))
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise LowbitError(f"{key(field)} must be a positive integer in the config, got {value!r}.")
    hidden, heads = config[key("hidden_size")], config[key("num_attention_heads")]
    if config.get("head_dim") is None and hidden % heads:
        raise LowbitError(
            f"hidden_size {hidden} is not a multiple of num_attention_heads {heads} and the config gives no head_dim."
        )


def load_config(config_or_path: ConfigSource) -> PretrainedConfig:
    """The ``transformers`` config a model is built from (what ``AutoConfig.for_model`` gives).

    A ``quantization_config`` is a checkpoint's manifest, not architecture, and is left out;
    read it with :func:`read_raw_config`. Raises :class:`LowbitError` for a config without a
    ``model_type``, one this ``transformers`` does not know, or fields that are missing or not
    numbers.
    """
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = read_raw_config(config_or_path)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise LowbitError(
            "the config has no model_type, so lowbit cannot tell which architecture to build; give the "
            "config.json published with the model."
        )
    if model_type not in CONFIG_MAPPING:
        raise LowbitError(
            f"model_type {model_type!r} is unknown to transformers {transformers.__version__}; upgrade "
            "transformers if the model is newer than it."
        )
    config_class = CONFIG_MAPPING[model_type]
    language_class = getattr(config_class, "sub_configs", {}).get("text_config", config_class)
    text_class = language_class if isinstance(raw.get("text_config"), Mapping) else config_class
    language_model_config(raw, getattr(text_class, "attribute_map", {}))
    fields = {name: value for name, value in raw.items() if name not in NOT_ARCHITECTURE}
    try:
        return AutoConfig.for_model(**fields)
    except (TypeError, ValueError) as error:
        raise LowbitError(f"transformers cannot build a {model_type} config from it: {error}") from None
