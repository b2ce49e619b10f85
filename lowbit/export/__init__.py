"""Exporters: one per target layout, each a name, what it can carry, and how it writes.

``native`` is lowbit's own checkpoint (``native.py``): a transformers directory whose
``config.json`` carries the manifest and whose safetensors hold the packed parts. Targets
with layouts of their own (GGUF, GPTQ, AWQ, compressed-tensors, MLX) are one module each
here, converting from lowbit's canonical parts, and register themselves below::

    # export/compressed_tensors.py (sketch)
    def carries(fmt):                         # None when it can, else why not
        if fmt.family != "int" or fmt.bits not in (4, 8):
            return "compressed-tensors packs INT4/INT8 weights only"
    def write(model, path, tokenizer, overwrite): ...   # repack parts, write config + safetensors
    register(Exporter("compressed-tensors", "vLLM / transformers", carries, write))

:func:`export` refuses, before writing anything, a model holding a format its target cannot
carry, naming a target that can.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from lowbit.errors import LowbitError, UnknownNameError
from lowbit.export import mlx, native
from lowbit.export import awq, compressed_tensors, gguf, gptq, ollama
from lowbit.formats import Format
from lowbit.nn import quantized_linears


@dataclass(frozen=True)
class Exporter:
    name: str
    #: what reads it (shown in help and errors)
    consumers: str
    #: ``fmt -> None`` when the target can carry ``fmt``, else a sentence saying why not
    carries: Callable[[Format], str | None]
    #: ``(model, path, tokenizer, overwrite) -> path``: write atomically, refuse an existing path
    write: Callable[[nn.Module, Path, object, bool], Path]


_EXPORTERS: dict[str, Exporter] = {}


def register(exporter: Exporter) -> Exporter:
    _EXPORTERS[exporter.name] = exporter
    return exporter


def exporter_names() -> list[str]:
    return list(_EXPORTERS)


def get_exporter(name: str) -> Exporter:
    if name not in _EXPORTERS:
        raise UnknownNameError(f"unknown export target {name!r}; targets: {', '.join(_EXPORTERS)}")
    return _EXPORTERS[name]


def check_carries(model: nn.Module, exporter: Exporter) -> None:
    """Refuse a model with a format ``exporter`` cannot carry, naming a target that can."""
    for name, module in quantized_linears(model).items():
        reason = exporter.carries(module.format)
        if reason is not None:
            able = [other.name for other in _EXPORTERS.values() if other.carries(module.format) is None]
            hint = f"; {', '.join(able)} can carry it" if able else ""
            raise LowbitError(f"{exporter.name} cannot carry {module.format.name} ({name}): {reason}{hint}")


def export_model(
    model: nn.Module, path: str | os.PathLike, target: str = "native", *, tokenizer=None, overwrite: bool = False
) -> Path:
    """Write a model quantized by lowbit to ``path`` in ``target``'s layout."""
    if getattr(model, "lowbit_manifest", None) is None:
        raise LowbitError("this model was not quantized by lowbit; quantize it first (lowbit.quantize)")
    exporter = get_exporter(target)
    check_carries(model, exporter)
    return exporter.write(model, Path(path), tokenizer, overwrite)


register(
    Exporter(
        "native",
        "lowbit.load, lowbit eval / generate / inspect",
        lambda fmt: None,  # every lowbit format, as it is
        lambda model, path, tokenizer, overwrite: native.save_native(model, path, tokenizer, overwrite=overwrite),
    )
)
register(
    Exporter(
        "mlx",
        "mlx-lm (Apple silicon)",
        mlx.carries,
        lambda model, path, tokenizer, overwrite: mlx.save_mlx(model, path, tokenizer, overwrite=overwrite),
    )
)
register(Exporter("compressed-tensors", "vLLM, transformers (compressed-tensors)", compressed_tensors.carries, compressed_tensors.write))
register(Exporter("gptq", "GPTQModel, transformers, vLLM (GPTQ v1 zeros)", gptq.carries, gptq.writer("gptq")))
register(Exporter("gptq-v2", "GPTQModel, vLLM (GPTQ v2 zeros)", gptq.carries, gptq.writer("gptq-v2")))
register(Exporter("awq", "AutoAWQ, GPTQModel, transformers, vLLM (AWQ GEMM)", awq.carries, awq.write))
register(Exporter("gguf", "llama.cpp, Ollama, LM Studio", gguf.carries, gguf.write))
register(
    Exporter(
        "ollama",
        "Ollama (ollama create NAME -f DIR/Modelfile)",
        gguf.carries,
        lambda model, path, tokenizer, overwrite: ollama.write_ollama(
            path, lambda gguf_path: gguf.write(model, gguf_path, tokenizer, False), overwrite=overwrite
        ),
    )
)
