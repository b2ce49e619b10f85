"""Write a model as a GGUF file that llama.cpp loads and runs: ``lowbit export MODEL --to gguf --type Q4_K_M``.

The file is written by gguf-py's ``GGUFWriter`` (llama.cpp's own Python writer: header, key
types, alignment and tensor table as llama.cpp reads them), streamed: the tensor table is
written first from shapes and the chosen types alone, then each tensor is read (one decoder
layer at a time for a model lazily loaded from disk), converted to llama.cpp's layout,
quantized and appended, so the model is never held twice. The file is written as
``.NAME.partial-PID`` beside the output and renamed into place when complete; an existing
output is refused unless ``overwrite``.

What goes in:

- ``general.*``: architecture, name, ``file_type`` (the mix), ``quantization_version``;
- the architecture's hyperparameters, tensor names and layouts (``gguf_arch``);
- each tensor in the type llama-quantize would choose for the mix (``gguf_mix``), quantized by
  lowbit's block formats (``lowbit.formats.gguf_blocks.quantize_ggml``: llama.cpp's bytes),
  with an importance vector per tensor when an imatrix or calibration statistics are given;
  a linear lowbit has already quantized to a GGUF block format is copied as it is;
- the tokenizer (``gguf_tokenizer``): copied from a GGUF source, converted from a HF one.

Re-quantizing a GGUF source whose tensors are already low-bit is refused unless
``allow_requantize``, as llama-quantize refuses it (the error of the first quantization would
be compounded by the second).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.arch import decoder_layers
from lowbit.errors import LowbitError
from lowbit.export.atomic import (
    SPACE_MARGIN_BYTES,
    check_file_output,
    recover_leftovers,
)
from lowbit.export.gguf_arch import gguf_family
from lowbit.export.gguf_mix import (
    UNQUANTIZED_TYPES,
    MixChoice,
    MixOptions,
    ModelFacts,
    TensorSite,
    choose_types,
    file_type,
    mix_name,
)
from lowbit.export.gguf_tokenizer import add_tokenizer
from lowbit.formats.gguf_blocks import quantize_ggml
from lowbit.formats.gguf_types import GGML_TYPES
from lowbit.gguf_names import tensor_names
from lowbit.nn import QuantLinear
from lowbit.plan import Plan, make_rule
from lowbit.version import __version__

if TYPE_CHECKING:
    from lowbit.algorithms.imatrix import ImportanceMatrix

#: ggml types a GGUF source may hold without its tensors counting as already quantized
FLOAT_TYPE_IDS = frozenset(GGML_TYPES[name].type_id for name in UNQUANTIZED_TYPES)


@dataclass(frozen=True)
class GgufOptions:
    """What ``llama-quantize`` is told: the mix and the options that change its types."""

    type: str = "Q8_0"
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    #: ``(regex, ggml type)``, as ``--tensor-type REGEX=TYPE``: the first match decides
    tensor_types: tuple[tuple[str, str], ...] = ()
    allow_requantize: bool = False

    def mix_options(self, has_imatrix: bool) -> MixOptions:
        return MixOptions(self.output_tensor_type, self.token_embedding_type, self.pure, self.tensor_types, has_imatrix)


def parse_tensor_types(specs: list[str] | tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``["attn_v=q8_0", "ffn_down=q6_k"]`` -> ``(("attn_v", "Q8_0"), ...)`` (llama-quantize's ``--tensor-type``)."""
    pairs = []
    for spec in specs:
        pattern, sep, kind = spec.rpartition("=")
        if not sep or not pattern or not kind:
            raise LowbitError(f"--tensor-type takes PATTERN=TYPE (e.g. attn_v=q8_0); got {spec!r}")
        pairs.append((pattern, kind.strip().upper()))
    return tuple(pairs)


@dataclass
class _Tensor:
    """One tensor of the output: where its values come from and what it becomes."""

    hf_name: str | None  # None for a tensor computed from the config (rope factors)
    gguf_name: str
    shape: tuple[int, ...]
    value: torch.Tensor | None = None  # computed tensors only
    module: QuantLinear | None = None  # a linear lowbit already quantized to a GGUF block format
    ggml_type: str = "F32"
    layer: int | None = None


def _model_facts(config: dict) -> ModelFacts:
    return ModelFacts(
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        experts=config.get("num_local_experts") or config.get("num_experts") or 0,
    )


def _layer_of(name: str, layers_path: str) -> int | None:
    match = re.match(rf"{re.escape(layers_path)}\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _tensor(name: str, gguf_name: str, parameter: torch.Tensor | QuantLinear, layer: int | None) -> _Tensor:
    if not isinstance(parameter, QuantLinear):
        return _Tensor(name, gguf_name, tuple(parameter.shape), layer=layer)
    if parameter.format.family != "gguf":
        raise LowbitError(
            f"{name} is quantized as {parameter.format.name}, which GGUF cannot hold; export the original "
            "model with --to gguf --type TYPE (lowbit quantizes it to llama.cpp's types)"
        )
    shape = (parameter.out_features, parameter.in_features)
    return _Tensor(name, gguf_name, shape, module=parameter, ggml_type=parameter.format.type_name.upper(), layer=layer)


def _collect_tensors(model: nn.Module, config: dict, layers_path: str) -> list[_Tensor]:
    """Every tensor the GGUF file holds, in transformers' order, with its GGUF name."""
    arch, family = gguf_family(config)
    names = tensor_names(config["model_type"], config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings")) or family.drop_lm_head
    tensors, seen = [], set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        owned = [("weight", module)] if isinstance(module, QuantLinear) else list(module.named_parameters(recurse=False))
        for local, parameter in owned:
            name = prefix + local
            if id(parameter) in seen or (name == "lm_head.weight" and tied):
                continue
            seen.add(id(parameter))
            gguf_name = names.get(name)
            if gguf_name is None:
                raise LowbitError(f"{name} has no tensor in llama.cpp's {arch} architecture; lowbit cannot write this model as GGUF")
            tensors.append(_tensor(name, gguf_name, parameter, _layer_of(name, layers_path)))
    for gguf_name, value in family.extra_tensors(config):
        tensors.append(_Tensor(None, gguf_name, tuple(value.shape), value=value))
    return tensors


def _choose(tensors: list[_Tensor], options: GgufOptions, config: dict, has_imatrix: bool) -> MixChoice:
    """Each tensor's type by the mix; a linear already in a GGUF block format keeps its own."""
    sites = [TensorSite(t.gguf_name, t.shape) for t in tensors]
    choice = choose_types(sites, options.type, _model_facts(config), options.mix_options(has_imatrix))
    for tensor in tensors:
        tensor.ggml_type = tensor.ggml_type if tensor.module is not None else choice.types[tensor.gguf_name]
    return choice


def gguf_plan(model: nn.Module, options: GgufOptions, method, has_imatrix: bool = False) -> Plan:
    """A lowbit plan that quantizes each decoder linear to the ``gguf-<type>`` format the mix gives it
    (a type with no block format, F16 for rows no block divides, keeps it float), by ``method``.

    The pipeline then runs any algorithm over llama.cpp's block geometry (GPTQ's error feedback
    within K-quant super-blocks), and :func:`write_gguf` copies the blocks as they are.
    """
    config = model.config.to_dict()
    layers_path, _ = decoder_layers(model)
    tensors = _collect_tensors(model, config, layers_path)
    _choose(tensors, GgufOptions(**{**options.__dict__, "type": mix_name(options.type)}), config, has_imatrix)
    rules = [
        make_rule(tensor.hf_name.removesuffix(".weight"), f"gguf-{tensor.ggml_type.lower()}", method)
        for tensor in tensors
        if tensor.layer is not None and tensor.ggml_type not in UNQUANTIZED_TYPES
        and isinstance(model.get_submodule(tensor.hf_name.removesuffix(".weight")), (nn.Linear, QuantLinear))
    ]  # fmt: skip
    return Plan([*rules, make_rule("*", "keep")], f"gguf-{mix_name(options.type).lower()}")


def check_requantize(source: str | os.PathLike | None, tensors: list[_Tensor], allow: bool) -> None:
    """llama-quantize's "requantizing from type X is disabled": a low-bit source tensor given another type."""
    if allow or source is None or not str(source).lower().endswith(".gguf") or not Path(source).is_file():
        return
    from lowbit.sources import read_gguf_layout

    stored = {info.name: info.ggml_type for info in read_gguf_layout(Path(source)).tensors}
    for tensor in tensors:
        type_id = stored.get(tensor.gguf_name)
        if type_id is None or type_id in FLOAT_TYPE_IDS or type_id == GGML_TYPES[tensor.ggml_type].type_id:
            continue
        source_type = gguf.GGMLQuantizationType(type_id).name
        raise LowbitError(
            f"{source} is already quantized ({tensor.gguf_name} is {source_type}); re-quantizing it to "
            f"{tensor.ggml_type} compounds two errors. Start from the original model, or pass --allow-requantize "
            "(allow_requantize=True) as llama-quantize asks"
        )


def check_gguf_output(
    path: str | os.PathLike, overwrite: bool, source: str | os.PathLike | None = None, needed_bytes: int = 0
) -> Path:
    """Refuse, before any work, a GGUF output that exists (unless ``overwrite``), is the file being
    read, or does not fit on its disk; leftovers of a killed run beside it are removed."""
    path = check_file_output(path)
    recover_leftovers(path)
    if source is not None and path.exists() and Path(source).exists() and os.path.samefile(path, source):
        raise LowbitError(f"the output {path} is the model being read; choose another output")
    if path.exists() and not overwrite:
        raise LowbitError(f"{path} already exists; choose another output or pass --overwrite (overwrite=True)")
    free = shutil.disk_usage(_existing_parent(path)).free
    if needed_bytes + SPACE_MARGIN_BYTES > free:
        raise LowbitError(
            f"not enough disk space for {path}: it needs about {needed_bytes / 1e6:,.1f} MB and "
            f"{free / 1e6:,.1f} MB are free; free some space or choose another output"
        )
    return path


def _existing_parent(path: Path) -> Path:
    return next(parent for parent in path.parents if parent.exists())


def _stored_bytes(tensor: _Tensor) -> tuple[tuple[int, ...], int]:
    """The byte shape (rows of raw bytes) and size of ``tensor`` in its type."""
    ggml = GGML_TYPES[tensor.ggml_type]
    row = tensor.shape[-1]
    bytes_per_row = row // ggml.block_size * ggml.block_bytes
    shape = (*tensor.shape[:-1], bytes_per_row)
    return shape, int(np.prod(shape))


def encode(ggml_type: str, value: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
    """``value`` (float, any shape, rows along the last dimension) as the bytes of ``ggml_type``."""
    value = value.detach().cpu()
    if ggml_type == "F32":
        return value.float().contiguous().numpy().view(np.uint8).reshape(*value.shape[:-1], -1)
    if ggml_type in ("F16", "BF16"):
        half = torch.float16 if ggml_type == "F16" else torch.bfloat16
        return value.float().to(half).contiguous().view(torch.int16).numpy().view(np.uint8).reshape(*value.shape[:-1], -1)
    rows = value.reshape(-1, value.shape[-1]).float()
    return quantize_ggml(ggml_type, rows, importance).numpy().reshape(*value.shape[:-1], -1)


def _general_metadata(writer: gguf.GGUFWriter, model: nn.Module, mix: str, name: str | None) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(getattr(model.config, "name_or_path", None) or model.config.model_type).name)
    writer.add_quantized_by(f"lowbit {__version__}")
    writer.add_file_type(file_type(mix))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _values(model: nn.Module, tensors: list[_Tensor], layers_path: str, config: dict, layout) -> Iterator[tuple[_Tensor, torch.Tensor]]:
    """Each tensor's value in llama.cpp's layout, reading a lazily loaded model one layer at a time
    and releasing each layer once written."""
    lazy = getattr(model, "lowbit_weights", None)
    if lazy is not None:
        lazy.materialize_outside(f"{layers_path}.")
    state = dict(model.named_parameters())
    current = None
    for tensor in tensors:
        if lazy is not None and tensor.layer != current:
            if current is not None:
                model.get_submodule(f"{layers_path}.{current}").to("meta")  # written: release it
            current = tensor.layer
            if current is not None:
                lazy.materialize(f"{layers_path}.{current}.")
                state = dict(model.named_parameters())
        if tensor.value is not None:
            yield tensor, tensor.value
        elif tensor.module is not None:
            yield tensor, layout(tensor.hf_name, tensor.module.weight_blocks, config)
        else:
            yield tensor, layout(tensor.hf_name, state[tensor.hf_name].data, config)


def write_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    options: GgufOptions = GgufOptions(),
    *,
    importance: ImportanceMatrix | None = None,
    tokenizer_source=None,
    source: str | os.PathLike | None = None,
    name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``model`` (a transformers causal LM, possibly lazily loaded) to the GGUF file ``path``.

    ``importance``: an importance matrix (llama.cpp's imatrix) whose entries weight each
    tensor's rounding error per column; ``tokenizer_source``: what the tokenizer keys are made
    from (``gguf_tokenizer.tokenizer_metadata``: a GGUF file, a directory, a tokenizer);
    ``source``: the file the model was read from (a low-bit GGUF source is refused unless
    ``options.allow_requantize``). A model that was lazily loaded is spent afterwards (its
    layers are released as they are written). Returns a summary: path, type, bytes, seconds,
    the count of each ggml type, and llama.cpp's fallback notes.
    """
    started = time.perf_counter()
    mix = mix_name(options.type)
    options = GgufOptions(**{**options.__dict__, "type": mix})
    config = model.config.to_dict()
    arch, family = gguf_family(config)
    layers_path, _ = decoder_layers(model)
    tensors = _collect_tensors(model, config, layers_path)
    choice = _choose(tensors, options, config, importance is not None)
    check_requantize(source, tensors, options.allow_requantize)
    sizes = [_stored_bytes(tensor) for tensor in tensors]
    path = check_gguf_output(path, overwrite, source, needed_bytes=sum(size for _, size in sizes))
    if choice.summary():  # llama.cpp warns once per tensor; one line says it here, the summary lists them
        warnings.warn(f"GGUF {mix}: {choice.summary()}, e.g. {choice.notes[0]}", stacklevel=2)

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.partial-{os.getpid()}"
    writer = gguf.GGUFWriter(temporary, arch)
    try:
        _general_metadata(writer, model, mix, name or (Path(source).stem if source is not None else None))
        family.hyperparameters(writer, config)
        if tokenizer_source is not None:
            add_tokenizer(writer, tokenizer_source, vocab_size=config["vocab_size"])
        for tensor, (byte_shape, nbytes) in zip(tensors, sizes):
            writer.add_tensor_info(
                tensor.gguf_name, byte_shape, np.dtype(np.uint8), nbytes, gguf.GGMLQuantizationType[tensor.ggml_type]
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        values = _values(model, tensors, layers_path, config, family.layout)
        for tensor, value in tqdm(values, total=len(tensors), desc=f"GGUF {mix}", unit="tensor", disable=not progress):
            if tensor.module is not None:
                data = value.numpy()
            else:
                weights = importance.importance(tensor.gguf_name) if importance is not None else None
                data = encode(tensor.ggml_type, value, weights if tensor.ggml_type not in UNQUANTIZED_TYPES else None)
            writer.write_tensor_data(data)
        writer.close()
        temporary.replace(path)
    except BaseException:
        for handle in writer.fout or ():
            handle.close()
        temporary.unlink(missing_ok=True)
        raise
    counts: dict[str, int] = {}
    for tensor in tensors:
        counts[tensor.ggml_type] = counts.get(tensor.ggml_type, 0) + 1
    return {
        "path": str(path),
        "target": "gguf",
        "type": mix,
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 3),
        "tensor_types": counts,
        "fallbacks": choice.notes,
        "imatrix": importance is not None,
    }


def carries(fmt) -> str | None:
    """The exporter's test: a linear lowbit quantized is copied as it is, so only llama.cpp's block types fit."""
    if fmt.family != "gguf":
        return "GGUF holds llama.cpp's block types (gguf-q4_k …); export the original model with a GGUF type instead"
    return None


def write(model: nn.Module, path: Path, tokenizer, overwrite: bool) -> Path:
    """The registered exporter: a model whose linears lowbit quantized to GGUF block formats, copied
    as they are; the other tensors (embeddings, a kept ``lm_head``) are written F16, norms F32."""
    source = getattr(model, "lowbit_source", None)
    write_gguf(model, path, GgufOptions("F16"), tokenizer_source=tokenizer or source, source=source, overwrite=overwrite)
    return Path(path)
