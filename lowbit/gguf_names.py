"""Hugging Face tensor names -> llama.cpp (GGUF) tensor names, for every family lowbit knows.

llama.cpp names tensors by role and block (``blk.0.attn_q.weight``, ``blk.3.ffn_down.weight``,
``output.weight``), transformers by module path (``model.layers.0.self_attn.q_proj.weight``).
Whatever speaks to llama.cpp needs the map: importance matrices (``lowbit imatrix``) key their
entries by GGUF name, and the GGUF writer names its tensors the same way.

The table itself is gguf-py's (``gguf.get_tensor_name_map``: every name transformers uses
for each architecture, kept by llama.cpp beside its converter), so it is not repeated here;
this module only picks llama.cpp's architecture for a transformers ``model_type`` (Mistral
converts as ``llama``, as ``convert_hf_to_gguf.py`` does) and turns the lookup into clear errors.
"""

from __future__ import annotations

from functools import lru_cache

import gguf

from lowbit.errors import LowbitError

#: transformers ``model_type`` -> llama.cpp architecture, where the two names differ
GGUF_ARCHITECTURE_ALIASES = {"mistral": "llama"}
_ARCHITECTURES = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def gguf_architecture(model_type: str) -> str:
    """llama.cpp's architecture name for a transformers ``model_type`` (``mistral`` -> ``llama``)."""
    name = GGUF_ARCHITECTURE_ALIASES.get(model_type, model_type)
    if name not in _ARCHITECTURES:
        raise LowbitError(f"llama.cpp has no architecture for model type {model_type!r}, so its tensors have no GGUF names")
    return name


class TensorNames:
    """The GGUF name of each transformers tensor of one model (architecture and block count)."""

    def __init__(self, model_type: str, blocks: int) -> None:
        self.architecture = gguf_architecture(model_type)
        self.blocks = blocks
        self._map = gguf.get_tensor_name_map(_ARCHITECTURES[self.architecture], blocks)

    def get(self, hf_name: str) -> str | None:
        """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``; a module path
        without a suffix gets ``.weight`` (the matrix a linear multiplies by). None if unknown."""
        if not hf_name.endswith((".weight", ".bias")):
            hf_name += ".weight"
        return self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def __getitem__(self, hf_name: str) -> str:
        name = self.get(hf_name)
        if name is None:
            raise LowbitError(f"{hf_name} has no GGUF name in llama.cpp's {self.architecture} architecture")
        return name


@lru_cache(maxsize=16)
def tensor_names(model_type: str, blocks: int) -> TensorNames:
    """The (cached) name map of a ``model_type`` with ``blocks`` decoder layers."""
    return TensorNames(model_type, blocks)
