"""Architecture knowledge, in one table rather than a class per model family.

What the pipeline needs to know of a transformers causal LM is where its decoder layers
are. Tested families are listed in ``ARCHITECTURES``; any other decoder-only model whose
layers sit at one of the usual places is handled by the generic fallback, with a warning.
"""

from __future__ import annotations

import warnings

from torch import nn

from lowbit.errors import LowbitError

#: model_type -> attribute path of the decoder layers (each tested with a tiny random model)
ARCHITECTURES = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "phi3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
}

#: where other decoder-only models keep their layers
FALLBACK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks")


def _get_path(model: nn.Module, path: str) -> nn.Module | None:
    module = model
    for attribute in path.split("."):
        module = getattr(module, attribute, None)
        if module is None:
            return None
    return module


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of a causal LM's decoder layers; a clear error if it has none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        path = ARCHITECTURES[model_type]
        return path, _get_path(model, path)
    for path in FALLBACK_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            warnings.warn(
                f"architecture {model_type!r} is not in lowbit's tested list "
                f"({', '.join(ARCHITECTURES)}); using its layers at {path}",
                stacklevel=2,
            )
            return path, layers
    raise LowbitError(
        f"unsupported architecture {model_type!r}: lowbit quantizes decoder-only causal LMs "
        f"({', '.join(ARCHITECTURES)}, and others that keep their layers at {' or '.join(FALLBACK_PATHS)})"
    )


def base_model(model: nn.Module, layers_path: str) -> nn.Module:
    """The module that owns the decoder layers (runs embeddings, masks and layers, not lm_head)."""
    owner_path = layers_path.rsplit(".", 1)[0]
    return _get_path(model, owner_path)
