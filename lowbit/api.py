"""The public API: one function per verb. The CLI is a thin layer over these.

    import lowbit
    model = lowbit.quantize("path/or/model.gguf", "int4-g128")   # a transformers model
    lowbit.save(model, "out/")
    model = lowbit.load("out/")
    print(lowbit.evaluate(model, reference="path/or/model.gguf"))
"""

from __future__ import annotations

import copy
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from lowbit.algorithms import AlgorithmConfig
from lowbit.config import read_raw_config
from lowbit.device import resolve_device
from lowbit.errors import LowbitError
from lowbit.export import export_model, get_exporter
from lowbit.export.atomic import check_output
from lowbit.export.foreign import foreign_method, inspect_foreign, load_foreign
from lowbit.export.native import estimated_bytes
from lowbit.inspection import inspect_checkpoint
from lowbit.nn import dense_cache
from lowbit.eval import bits_per_weight, evaluate_windows, reference_log_probs, weight_bytes
from lowbit.eval.verdict import QUALITY_BUDGETS, Rung, ladder, meets, verdict
from lowbit.pipeline import return_freed_memory, plan_uses_statistics, quantize_model
from lowbit.plan import Plan, resolve_scheme
from lowbit.sources import (
    DEFAULT_MODEL,
    ModelSource,
    builtin_calibration_path,
    check_calibration_length,
    load_model,
    load_text,
    load_tokenizer,
    random_windows,
    resolve_model,
    token_windows,
    tokenize,
)

ModelLike = nn.Module | str | os.PathLike

#: the scheme ``quantize`` and ``export`` use when none is named
DEFAULT_SCHEME = "int4-g128"
#: the schemes ``compare`` runs when none are named (the README's table)
DEFAULT_SCHEMES = ("int8", "int4-g128", "int4-g128+clip", "nf4", "nf4-dq", "int3-g128", "fp8", "mxfp4")
#: the dev protocol: 40 windows of 512 tokens
DEFAULT_WINDOWS = 40
DEFAULT_WINDOW_LENGTH = 512


def _model_and_tokenizer(model: ModelLike, tokenizer=None, dtype=None, lazy: bool = False):
    """``(model, tokenizer)`` of a loaded model or of anything :func:`load` takes. ``lazy``: an
    unquantized model's weights stay on disk (``model.lowbit_weights`` loads them)."""
    if isinstance(model, nn.Module):
        return model, tokenizer or getattr(model, "lowbit_tokenizer", None)
    if foreign_method(model) is not None:  # a GPTQ, AWQ or compressed-tensors checkpoint made elsewhere
        loaded, loaded_tokenizer = load_foreign(model)
        loaded.lowbit_tokenizer, loaded.lowbit_source = tokenizer or loaded_tokenizer, str(model)
        return loaded, loaded.lowbit_tokenizer
    source = resolve_model(model)
    if source.kind == "native":
        from lowbit.export.native import load_native

        loaded, loaded_tokenizer = load_native(source.path, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    else:
        loaded, loaded_tokenizer, source = load_model(source, dtype=dtype, lazy=lazy)
    loaded.lowbit_tokenizer = tokenizer or loaded_tokenizer
    loaded.lowbit_source = str(source)
    return loaded, loaded.lowbit_tokenizer


def load(path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a model: a native lowbit checkpoint (quantized), a HF directory, a GGUF file or hub id.

    The tokenizer, when there is one, is at ``model.lowbit_tokenizer``.
    """
    return _model_and_tokenizer(path, dtype=dtype)[0]


#: calibration windows drawn from the built-in calibration text (about 4,500 tokens)
BUILTIN_CALIBRATION_SAMPLES = 16


def calibration_tokens(
    tokenizer, data: str | os.PathLike, samples: int = 128, length: int = 512, seed: int = 0, distinct: bool = True
) -> torch.Tensor:
    """``samples`` calibration windows of ``length`` tokens at random starts of the text in ``data``
    (a .txt, a .jsonl of texts or chats, or a directory). The text must hold ``samples * length``
    tokens unless ``distinct`` is False (windows may then overlap: the short built-in text)."""
    return random_windows(tokenize(tokenizer, load_text(data, tokenizer)), samples, length, seed, distinct)


def _calibration_for(plans: list[Plan], tokenizer, calibration, samples: int, length: int) -> torch.Tensor | None:
    """Token ids for the plans' algorithms that use statistics: the user's, else the built-in text."""
    if isinstance(calibration, torch.Tensor):
        return calibration
    if calibration is not None:
        return calibration_tokens(tokenizer, calibration, samples, length)
    if tokenizer is None or not any(plan_uses_statistics(plan) for plan in plans):
        return None
    return calibration_tokens(tokenizer, builtin_calibration_path(), BUILTIN_CALIBRATION_SAMPLES, length, distinct=False)


_KEEP_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip


def _parse_keep_dtype(keep_dtype: str | torch.dtype | None) -> torch.dtype | None:
    if keep_dtype is None or keep_dtype in _KEEP_DTYPES.values():
        return keep_dtype
    if isinstance(keep_dtype, str) and keep_dtype.lower() in _KEEP_DTYPES:
        return _KEEP_DTYPES[keep_dtype.lower()]
    raise LowbitError(f"keep dtype must be one of fp32, bf16, fp16, got {keep_dtype!r}")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LowbitError(f"the batch size must be a whole number of at least 1, got {batch_size!r}")


def kept_dtype(model: nn.Module, keep_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype the unquantized tensors of ``model`` (embeddings, norms, a kept ``lm_head``)
    are *stored* in once it is quantized; the model keeps computing in its own dtype.

    ``keep_dtype`` when given (``torch.float32`` keeps float32); else the 16-bit dtype its
    config declares (bf16 or fp16); else its own dtype when that is 16-bit; else float16 (a
    float32 source such as a GGUF dequantized by transformers: the default SmolLM2's int4-g128
    output shrinks from 168.8 to about 116 MB; bfloat16 instead where a value lies beyond
    float16's range). Their values are rounded to it at once, so the model in memory is the
    one a load of the checkpoint gives back, and they are upcast on load to the dtype the
    model computes in (the config's ``dtype``).
    """
    if keep_dtype is not None:
        return keep_dtype
    declared = getattr(getattr(model, "config", None), "dtype", None)
    declared = getattr(torch, declared) if isinstance(declared, str) and hasattr(torch, declared) else declared
    if declared in (torch.bfloat16, torch.float16):
        return declared
    own = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return own if own in (torch.bfloat16, torch.float16) else torch.float16


def _check_calibration(model: nn.Module, plan: Plan, calibration, samples: int, length: int) -> None:
    """Refuse calibration token ids the model cannot read, or more calibration than this
    machine can hold (estimated from the sizes, before any is drawn), with the numbers."""
    import psutil

    if isinstance(calibration, torch.Tensor):
        vocabulary = model.get_input_embeddings().num_embeddings
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32) or calibration.numel() == 0:
            raise LowbitError(
                "calibration token ids must be a (samples, length) tensor of int64 or int32, "
                f"got shape {tuple(calibration.shape)} and {calibration.dtype}"
            )
        low, high = int(calibration.min()), int(calibration.max())
        if low < 0 or high >= vocabulary:
            raise LowbitError(f"calibration token ids must lie in 0..{vocabulary - 1} (the model's vocabulary), got {low}..{high}")
        samples, length = calibration.shape
    elif not plan_uses_statistics(plan):
        return
    for value, what in ((samples, "calibration samples"), (length, "calibration length")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LowbitError(f"{what} must be a whole number of at least 1, got {value!r}")
    # the token ids, and one layer's input and output hidden states for every token, in float32
    needed = samples * length * (8 + 2 * 4 * model.get_input_embeddings().embedding_dim)
    available = psutil.virtual_memory().available
    if needed > available // 2:
        raise LowbitError(
            f"{samples} calibration samples of {length} tokens need about {needed / 1e9:,.1f} GB of activations and "
            f"this machine has {available / 1e9:,.1f} GB available; use fewer --calibration-samples or a shorter --calibration-length"
        )


def quantize(
    model: ModelLike,
    scheme: str | Plan = DEFAULT_SCHEME,
    *,
    method: str | AlgorithmConfig | None = None,
    calibration: str | os.PathLike | torch.Tensor | None = None,
    calibration_samples: int = 128,
    calibration_length: int = 512,
    tokenizer=None,
    device: str | torch.device | None = None,
    keep_dtype: str | torch.dtype | None = None,
    allow_nonfinite: bool = False,
    progress: bool = True,
    imatrix: str | os.PathLike | None = None,
) -> nn.Module:
    """Quantize a model's linear layers as ``scheme`` says and return the transformers model.

    A NaN or infinite weight is an error naming the tensor; ``allow_nonfinite=True`` replaces
    them with zeros (and warns). Calibration is checked before it is drawn (token ids in the
    vocabulary, an activation size this machine can hold).

    ``model`` is a loaded transformers causal LM (quantized in place, as ``load_in_4bit`` users
    expect) or anything :func:`load` takes. ``scheme`` is a preset (``int4-g128``, ``nf4-dq`` …),
    a format name, either with ``+clip``, a plan file, or a :class:`~lowbit.plan.Plan`.
    ``method`` runs the rules that name no algorithm: a name (``"rtn"``) or a typed config
    (``RTNConfig(clip_search=True)``); default RTN. ``calibration`` (a text file, or token ids ``(samples, length)``) feeds the algorithms that
    use activation statistics, such as the clipping search; when they are in the plan and no
    calibration is given, lowbit's built-in calibration text is used. ``device`` is where each
    layer is worked on (default: CUDA when available, else CPU). ``keep_dtype``: the dtype the
    tensors that stay unquantized (embeddings, norms, a kept ``lm_head``) are stored in; default
    16 bits (:func:`kept_dtype`), ``"fp32"`` to store float32. The model computes in its own
    dtype either way. ``imatrix``: an importance matrix file (llama.cpp's GGUF or ``.dat``,
    ``lowbit imatrix``) whose per-column importance weights the clipping search instead of
    calibration statistics (no calibration text is then needed).
    """
    plan = resolve_scheme(scheme, method)
    keep = _parse_keep_dtype(keep_dtype)
    resolve_device(device)  # refuse a device the machine lacks before loading anything
    matrix = None
    if imatrix is not None:
        from lowbit.imatrix_file import read_imatrix

        matrix = read_imatrix(imatrix)  # before any model loads
    # a model given by path streams from disk: the pipeline reads one layer's weights at a time
    model, tokenizer = _model_and_tokenizer(model, tokenizer, lazy=True)
    importance = None if matrix is None else _importance_lookup(model, plan, matrix, imatrix)
    _check_calibration(model, plan, calibration, calibration_samples, calibration_length)
    if matrix is not None and calibration is None:
        tokens = None  # the importance matrix stands in for calibration statistics
    else:
        tokens = _calibration_for([plan], tokenizer, calibration, calibration_samples, calibration_length)
    return quantize_model(
        model, plan, calibration=tokens, device=device, progress=progress, allow_nonfinite=allow_nonfinite, source=getattr(model, "lowbit_source", None),
        keep_dtype=kept_dtype(model, keep), importance=importance,
    )  # fmt: skip


def _importance_lookup(model: nn.Module, plan: Plan, matrix, path):
    """Importance by linear name, from an imatrix's entries under llama.cpp's names; refuses a
    matrix made for another model (no linear found in it, or another width)."""
    from lowbit.arch import decoder_layers
    from lowbit.gguf_names import tensor_names
    from lowbit.nn import is_linear, linear_shape

    if not plan_uses_statistics(plan):
        warnings.warn(f"the importance matrix weights the clipping search (+clip); plan {plan.name!r} has none, so {path} is not used", stacklevel=3)
        return None
    names = tensor_names(model.config.model_type, len(decoder_layers(model)[1]))
    found = {}
    for name, module in model.named_modules():
        entry = names.get(name) if is_linear(module) else None
        values = None if entry is None else matrix.importance(entry)
        if values is None:
            continue
        if values.dim() != 1 or values.numel() != linear_shape(module)[1]:
            raise LowbitError(f"{path}: {entry} has importance for {values.shape[-1]} input columns, {name} has {linear_shape(module)[1]}; it was made for another model")
        found[name] = values
    if not found:
        raise LowbitError(f"{path} names none of this model's linears (as llama.cpp names them, e.g. blk.0.attn_q.weight); it was made for another model")
    return found.get


def save(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a quantized model as a native lowbit checkpoint (atomically); same as
    ``export(model, path, to="native")``."""
    return export_model(model, path, "native", tokenizer=tokenizer or getattr(model, "lowbit_tokenizer", None), overwrite=overwrite)


def export(
    model: ModelLike,
    path: str | os.PathLike,
    *,
    to: str = "native",
    scheme: str | Plan | None = None,
    method: str | AlgorithmConfig | None = None,
    calibration: str | os.PathLike | torch.Tensor | None = None,
    calibration_samples: int = 128,
    calibration_length: int = 512,
    tokenizer=None,
    device: str | torch.device | None = None,
    keep_dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
    imatrix: str | os.PathLike | None = None,
) -> dict:
    """Write ``model`` to ``path`` in the layout of target ``to`` (``lowbit.export.exporter_names()``).

    A model lowbit has already quantized (in memory, or a lowbit checkpoint path) is written
    as it is. Any other model is quantized first with ``scheme`` (default ``int4-g128``),
    ``method``, ``keep_dtype``, ``imatrix`` and the calibration options of :func:`quantize`. The output is checked before any work, and
    written under a temporary name renamed into place. Returns a summary: ``path``,
    ``target``, ``quantized_now``, ``plan``, ``modules`` (quantized linears), ``quantization_seconds`` and the
    weight bytes and bits per weight before and after.
    """
    exporter = get_exporter(to)
    if exporter.name in ("gguf", "ollama"):  # llama.cpp's types are chosen per tensor by a mix: scheme names it
        return export_gguf(
            model, path, scheme or "Q8_0", method=method or "rtn", calibration=calibration, calibration_samples=calibration_samples,
            calibration_length=calibration_length, tokenizer=tokenizer, device=device, overwrite=overwrite, progress=progress,
            ollama=exporter.name == "ollama",
        )  # fmt: skip
    source = None if isinstance(model, nn.Module) else str(model if foreign_method(model) else resolve_model(model))
    check_output(path, overwrite, inputs=[source])  # refuse before the slow part
    plan = None if scheme is None and method is None else resolve_scheme(scheme or DEFAULT_SCHEME, method)
    resolve_device(device)
    model, tokenizer = _model_and_tokenizer(model, tokenizer, lazy=True)
    to_quantize = None if getattr(model, "lowbit_manifest", None) is not None else plan or resolve_scheme(DEFAULT_SCHEME)
    inputs = [getattr(model, "lowbit_source", None)]
    check_output(path, overwrite, inputs=inputs, needed_bytes=estimated_bytes(model, to_quantize))  # shapes alone
    before = _describe(model)
    quantized_now = getattr(model, "lowbit_manifest", None) is None
    if quantized_now:
        quantize(
            model, plan or resolve_scheme(DEFAULT_SCHEME), calibration=calibration, calibration_samples=calibration_samples,
            calibration_length=calibration_length, tokenizer=tokenizer, device=device, allow_nonfinite=allow_nonfinite, keep_dtype=keep_dtype,
            progress=progress, imatrix=imatrix,
        )  # fmt: skip
    elif plan is not None:
        raise LowbitError(
            "this model is already quantized by lowbit; export it without a scheme or method, or start from the original"
        )
    written = export_model(model, path, exporter.name, tokenizer=tokenizer, overwrite=overwrite)
    manifest = model.lowbit_manifest
    after = _describe(model)
    return {
        "path": str(written),
        "target": exporter.name,
        "quantized_now": quantized_now,
        "plan": manifest["plan"]["name"],
        "modules": len(manifest["modules"]),
        "quantization_seconds": manifest["quantization_seconds"],
        "weight_bytes_before": before["weight_bytes"],
        "bits_per_weight_before": before["bits_per_weight"],
        "weight_bytes": after["weight_bytes"],
        "bits_per_weight": after["bits_per_weight"],
    }


def export_gguf(
    model: ModelLike,
    path: str | os.PathLike,
    type: str = "Q8_0",
    *,
    imatrix_file: str | os.PathLike | None = None,
    calibration: str | os.PathLike | torch.Tensor | None = None,
    calibration_samples: int = 128,
    calibration_length: int = 512,
    method: str = "rtn",
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    pure: bool = False,
    tensor_types: tuple[tuple[str, str], ...] | list[str] = (),
    allow_requantize: bool = False,
    tokenizer=None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    ollama: bool = False,
) -> dict:
    """Write ``model`` as a GGUF file of llama.cpp's mix ``type`` (``Q4_K_M``, ``Q8_0``, ``F16`` …),
    each tensor's type chosen as ``llama-quantize`` chooses it (``lowbit.export.gguf_mix``).

    ``imatrix_file``: llama.cpp's importance matrix file (``llama-imatrix`` or ``lowbit imatrix``);
    ``calibration``: a text whose importance matrix lowbit measures first (:func:`imatrix`).
    The options of ``llama-quantize``: ``output_tensor_type``, ``token_embedding_type``, ``pure``,
    ``tensor_types`` (``("attn_v=q8_0", ...)`` or ``(regex, type)`` pairs: the first match wins),
    ``allow_requantize`` (re-quantizing an already low-bit GGUF is refused otherwise).
    ``method``: ``rtn`` is llama.cpp's own rounding (weighted by the importance matrix); any
    other (``gptq``) runs through lowbit's pipeline on the ``calibration`` text over each
    linear's ggml block format (:func:`lowbit.export.gguf.gguf_plan`). Returns
    the writer's summary (path, type, bytes, seconds, tensor types, fallback notes).

    ``ollama``: ``path`` is a directory that receives the file as ``model.gguf`` and a
    Modelfile (TEMPLATE from the chat template, stop tokens) for ``ollama create NAME -f
    path/Modelfile``; the directory appears complete or not at all.
    """
    if ollama:  # the same export into the directory's model.gguf, then the Modelfile beside it
        options = {k: v for k, v in locals().items() if k not in ("model", "path", "type", "ollama", "overwrite")}
        from lowbit.export.ollama import GGUF_NAME, write_ollama

        summary: dict = {}
        directory = write_ollama(
            path, lambda gguf_path: summary.update(export_gguf(model, gguf_path, type, **options)), overwrite=overwrite
        )
        return {**summary, "path": str(directory / GGUF_NAME), "ollama": str(directory)}
    from lowbit.export.gguf import GgufOptions, check_gguf_output, gguf_plan, parse_tensor_types, write_gguf
    from lowbit.export.gguf_mix import mix_name
    from lowbit.imatrix_file import read_imatrix

    pairs = tuple(parse_tensor_types([t for t in tensor_types if isinstance(t, str)]))
    pairs += tuple(tuple(t) for t in tensor_types if not isinstance(t, str))
    options = GgufOptions(mix_name(type), output_tensor_type, token_embedding_type, pure, pairs, allow_requantize)
    if method != "rtn" and imatrix_file is not None:
        raise LowbitError(f"--method {method} measures its own statistics from --calibration; an imatrix file serves rtn only")
    if imatrix_file is not None and calibration is not None:
        raise LowbitError("give either an importance matrix file (--imatrix) or a calibration text, not both")
    source = None if isinstance(model, nn.Module) else str(resolve_model(model))
    check_gguf_output(path, overwrite, source)  # before the slow part
    resolve_device(device)
    importance = read_imatrix(imatrix_file) if imatrix_file is not None else None
    if method != "rtn":  # the pipeline runs it over llama.cpp's block geometry; the writer copies the blocks
        model, tokenizer = _model_and_tokenizer(model, tokenizer, lazy=True)
        plan = gguf_plan(model, options, method, has_imatrix=calibration is not None)
        quantize(
            model, plan, calibration=calibration, calibration_samples=calibration_samples, calibration_length=calibration_length,
            tokenizer=tokenizer, device=device, progress=progress,
        )  # fmt: skip
    elif calibration is not None:  # measured on a model of its own: a lazily loaded one is spent by it
        importance = imatrix(
            model, calibration, calibration_samples=calibration_samples, calibration_length=calibration_length,
            tokenizer=tokenizer, device=device, progress=progress,
        )  # fmt: skip
    model, tokenizer = _model_and_tokenizer(model, tokenizer, lazy=True)
    source = getattr(model, "lowbit_source", None) or source
    return write_gguf(
        model, path, options, importance=importance, tokenizer_source=tokenizer if source is None else source,
        source=source, overwrite=overwrite, progress=progress,
    )  # fmt: skip


def imatrix(
    model: ModelLike,
    calibration: str | os.PathLike | torch.Tensor,
    output: str | os.PathLike | None = None,
    *,
    calibration_samples: int = 128,
    calibration_length: int = 512,
    bos: bool | None = None,
    tokenizer=None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
):
    """The importance matrix of ``model`` over the ``calibration`` text, as llama.cpp's
    ``llama-imatrix`` measures it; written to ``output`` in its GGUF format when given
    (``llama-quantize --imatrix`` reads it). Returns the
    :class:`~lowbit.algorithms.imatrix.ImportanceMatrix`.

    The chunks are ``llama-imatrix``'s: the first ``calibration_samples`` consecutive windows
    of ``calibration_length`` tokens from the start of the text (a text too short for them is
    an error with the numbers), each window's first token replaced by BOS when the tokenizer
    adds one (``bos``: force it on or off). ``calibration`` may also be token ids
    ``(samples, length)``, used as they are. The output is checked before any work.
    """
    from lowbit.imatrix_file import check_imatrix_output, write_imatrix
    from lowbit.importance import collect_importance

    if output is not None:
        check_imatrix_output(output, overwrite)
    _check_batch_size(batch_size)
    resolve_device(device)
    if isinstance(calibration, torch.Tensor):
        tokens, dataset = calibration, "token ids"
    else:  # the text is read and checked before any model loads
        tokenizer = _tokenizer_first(model, tokenizer)
        tokens, dataset = imatrix_chunks(tokenizer, calibration, calibration_samples, calibration_length, bos), str(calibration)
    model, tokenizer = _model_and_tokenizer(model, tokenizer, lazy=True)
    if getattr(model, "lowbit_manifest", None) is not None:
        raise LowbitError("this model is already quantized by lowbit; an importance matrix is measured on the unquantized model")
    _check_calibration(model, None, tokens, *tokens.shape)
    matrix = collect_importance(model, tokens, dataset=dataset, device=device, batch_size=batch_size, progress=progress)
    if output is not None:
        write_imatrix(matrix, output, overwrite)
    return matrix


def imatrix_chunks(tokenizer, data: str | os.PathLike, samples: int, length: int, bos: bool | None = None) -> torch.Tensor:
    """``llama-imatrix``'s chunks of the text in ``data``: the first ``samples`` windows of
    ``length`` tokens, the first token of each replaced by BOS when ``bos`` (default: when the
    tokenizer adds one, :func:`expects_bos`)."""
    tokens = tokenize(tokenizer, load_text(data, tokenizer))
    check_calibration_length(tokens, samples, length)
    chunks = tokens[: samples * length].reshape(samples, length).clone()
    if expects_bos(tokenizer) if bos is None else bos:
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise LowbitError("this tokenizer has no BOS token to start the chunks with; pass bos=False (--no-bos)")
        chunks[:, 0] = tokenizer.bos_token_id
    return chunks


def expects_bos(tokenizer) -> bool:
    """Whether the model expects a BOS token first: its tokenizer puts one at the start of
    ``tokenizer("a")`` (SmolLM2's does not; Llama's and Gemma's do)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def evaluation_windows(
    tokenizer, data: str | os.PathLike | None, windows: int | None, window_length: int, bos: bool | None = None
) -> torch.Tensor:
    """Token windows for evaluation. ``data=None`` is the built-in sample; ``windows=None`` takes
    as many as the text holds, up to the dev protocol's 40.

    ``bos``: start every window with the tokenizer's BOS token followed by ``window_length - 1``
    tokens of text (``None``: when the tokenizer adds one itself, :func:`expects_bos`). Without
    BOS a window is ``window_length`` tokens of text.
    """
    tokens = tokenize(tokenizer, load_text(data, tokenizer))
    use_bos = expects_bos(tokenizer) if bos is None else bos
    if use_bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise LowbitError("this tokenizer has no BOS token to start the windows with; evaluate with bos=False (--no-bos)")
    length = window_length - 1 if use_bos else window_length
    if use_bos and length < 1:
        raise LowbitError(f"window length must be at least 2 tokens, got {window_length}")
    if windows is None:
        windows = max(1, min(DEFAULT_WINDOWS, tokens.numel() // max(length, 1)))
    text = token_windows(tokens, windows, length)
    if not use_bos:
        return text
    return torch.cat([torch.full((text.shape[0], 1), tokenizer.bos_token_id, dtype=text.dtype), text], dim=1)


def _tokenizer_first(model: ModelLike, tokenizer=None):
    """The tokenizer of ``model`` without loading its weights (to check the text first):
    a loaded model's, or the one saved beside a checkpoint; for a GGUF file the one in its
    dequantized cache when there is one (reading it from the GGUF takes seconds)."""
    if tokenizer is not None or isinstance(model, nn.Module):
        return tokenizer or getattr(model, "lowbit_tokenizer", None)
    if foreign_method(model) is not None:
        return load_tokenizer(ModelSource("hf", str(model)))
    source = resolve_model(model)
    if source.gguf_file:
        from lowbit.gguf_cache import entry_directory

        cached = entry_directory(Path(source.path) / source.gguf_file)
        if (cached / "tokenizer_config.json").is_file():
            source = ModelSource("hf", str(cached))
    return load_tokenizer(ModelSource("hf", source.path) if source.kind == "native" else source)


def describe_reference(model: nn.Module) -> str:
    """Where a reference model comes from, in words: "SmolLM2-135M-Instruct.Q4_1.gguf
    dequantized to float32", "models/llama (bfloat16)"."""
    dtype = _describe(model)["dtype"]
    source = getattr(model, "lowbit_source", None)
    if source is None:
        return f"the model given ({dtype})"
    if str(source).lower().endswith(".gguf"):
        return f"{Path(source).name} dequantized to {dtype}"
    return f"{source} ({dtype})"


def _describe(model: nn.Module) -> dict:
    return {
        "weight_bytes": weight_bytes(model),
        "bits_per_weight": bits_per_weight(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
    }


def evaluate(
    model: ModelLike,
    *,
    reference: ModelLike | None = None,
    data: str | os.PathLike | None = None,
    windows: int | None = None,
    window_length: int = DEFAULT_WINDOW_LENGTH,
    batch_size: int = 1,
    tokenizer=None,
    bos: bool | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity (and, with a reference, KL and top-1 agreement), weight memory and speed.

    Keys: ``perplexity``, ``kl_divergence``, ``top1_agreement`` (each with its standard error
    across windows: ``log_perplexity_se``, ``kl_divergence_se``, ``top1_agreement_se``),
    ``weight_bytes``, ``bits_per_weight``, ``tokens_per_second``, ``windows``,
    ``window_length``, and how it was measured (``data``, ``dtype``, ``device``, ``bos``,
    ``reference``). ``bos``: start each window with BOS (default: when the tokenizer adds one,
    :func:`expects_bos`). The text is read and checked before any model is loaded.
    ``device``: where the models run (moved there); by default where they are (the CPU for a
    model loaded from a path).
    """
    _check_batch_size(batch_size)
    target = None if device is None else resolve_device(device)  # refuse a missing device before loading
    tokenizer = _tokenizer_first(model, tokenizer)
    use_bos = expects_bos(tokenizer) if bos is None else bos
    token_windows_ = evaluation_windows(tokenizer, data, windows, window_length, use_bos)  # before any model
    model, tokenizer = _model_and_tokenizer(model, tokenizer)
    if reference is not None:
        reference, _ = _model_and_tokenizer(reference)
    if target is not None:
        model.to(target)
        if reference is not None:
            reference.to(target)
    result = evaluate_windows(model, token_windows_, reference, batch_size, progress)
    return {
        **result,
        **_describe(model),
        "data": str(data or "built-in sample"),
        "bos": use_bos,
        "reference": None if reference is None else describe_reference(reference),
    }


def _sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules sharing its parameter and buffer tensors (and tokenizer).

    Quantizing the copy replaces its linears with new modules and leaves the original's
    intact, so a comparison holds the float model once plus one quantized model. The copy's
    Parameters are new objects over the same memory, so moving a layer of the copy to a
    device and back (``.to`` swaps ``Parameter.data``) never moves the original's.
    """
    memo: dict[int, object] = {id(b): b for b in model.buffers()}
    memo.update({id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in model.parameters()})
    tokenizer = getattr(model, "lowbit_tokenizer", None)
    if tokenizer is not None:
        memo[id(tokenizer)] = tokenizer
    return copy.deepcopy(model, memo)


class _Measurement:
    """One unquantized model measured once on the evaluation windows; each scheme then
    quantizes a copy sharing its tensors (:func:`_sharing_copy`) and is measured against it.
    What :func:`compare` and :func:`recipe` share."""

    def __init__(self, model, plans, *, data, windows, window_length, calibration, batch_size, bos, keep_dtype, device, progress):
        keep = _parse_keep_dtype(keep_dtype)
        _check_batch_size(batch_size)
        if not isinstance(model, nn.Module) and resolve_model(model).kind == "native":
            raise LowbitError("compare needs an unquantized model to quantize and to measure against")
        tokenizer = _tokenizer_first(model)
        self.bos = expects_bos(tokenizer) if bos is None else bos
        self.windows = evaluation_windows(tokenizer, data, windows, window_length, self.bos)  # before any model
        self.base, tokenizer = _model_and_tokenizer(model, tokenizer)
        if getattr(self.base, "lowbit_manifest", None) is not None:
            raise LowbitError("compare needs an unquantized model to quantize and to measure against")
        self.keep_dtype = kept_dtype(self.base, keep)
        self.calibration = _calibration_for(plans, tokenizer, calibration, 128, window_length)
        self.calibration_name = None if self.calibration is None else str(calibration or "built-in calibration text")
        self.batch_size, self.device, self.progress = batch_size, device, progress
        self.data = str(data or "built-in sample")
        self.model = str(model) if not isinstance(model, nn.Module) else getattr(self.base, "lowbit_source", type(self.base).__name__)
        self.reference = reference_log_probs(self.base, self.windows, batch_size, progress)
        self.reference_row = {"scheme": f"reference ({_describe(self.base)['dtype']})", **_describe(self.base)}
        self.reference_row.update(evaluate_windows(self.base, self.windows, self.reference, batch_size, progress))
        self.reference_row["quantization_seconds"] = None
        return_freed_memory()  # the reference's logits are summed up: hand their pages back

    def measure(self, plan: Plan) -> dict:
        candidate = _sharing_copy(self.base)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a calibration note per scheme would only repeat
            quantize_model(
                candidate, plan, calibration=self.calibration, device=self.device, progress=self.progress,
                keep_dtype=self.keep_dtype, round_kept=False,  # the reference's own kept tensors: its summary holds
            )  # fmt: skip
        seconds = time.perf_counter() - start
        row = {"scheme": plan.name, **_describe(candidate), "quantization_seconds": seconds}
        row.update(evaluate_windows(candidate, self.windows, self.reference, self.batch_size, self.progress))
        del candidate
        return_freed_memory()  # the next scheme starts from the float model alone
        return row

    def summary(self) -> dict:
        return {
            "model": self.model,
            "reference": describe_reference(self.base),
            "data": self.data,
            "windows": int(self.windows.shape[0]),
            "window_length": int(self.windows.shape[1]),
            "calibration": self.calibration_name,
            "bos": self.bos,
            "keep_dtype": None if self.keep_dtype is None else str(self.keep_dtype).replace("torch.", ""),
        }


def _progress_line(index: int, total: int, label: str, progress: bool) -> None:
    """The overall progress across schemes, ``[3/8] int4-g128``, on stderr."""
    if progress:
        print(f"[{index}/{total}] {label}", file=sys.stderr, flush=True)


def compare(
    model: ModelLike = DEFAULT_MODEL,
    schemes: list[str | Plan] | tuple[str | Plan, ...] = DEFAULT_SCHEMES,
    *,
    data: str | os.PathLike | None = None,
    windows: int | None = None,
    window_length: int = DEFAULT_WINDOW_LENGTH,
    calibration: str | os.PathLike | None = None,
    batch_size: int = 1,
    bos: bool | None = None,
    keep_dtype: str | torch.dtype | None = None,
    budgets: dict[str, float] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Quantize ``model`` to each scheme, measure each against the unquantized model, and answer.

    Returns ``{"model", "reference", "rows", "verdict", "data", "windows", "window_length",
    "calibration", "bos", "keep_dtype"}``. ``rows`` (the reference first, then by size, largest
    first) have ``scheme``, ``bits_per_weight`` (decoder linears), ``weight_bytes`` (every
    weight), ``perplexity``, ``kl_divergence``, ``top1_agreement``, their standard errors across
    windows, ``quantization_seconds`` and ``tokens_per_second``. ``verdict``
    (``lowbit.eval.verdict``): per quality budget (default ``QUALITY_BUDGETS``: KL 0.02
    near-lossless, 0.1 good) the smallest scheme meeting it, and what to try next.

    Each scheme is quantized as :func:`quantize` would (``keep_dtype`` likewise), on a copy
    sharing the float model's tensors: memory holds the float model once plus one quantized
    model at a time; the reference is kept compactly (``lowbit.eval.quality``). The text is
    read and checked before any model is loaded.
    """
    plans = [resolve_scheme(s) for s in schemes]  # refuse a bad scheme before any heavy work
    measurement = _Measurement(
        model, plans, data=data, windows=windows, window_length=window_length, calibration=calibration,
        batch_size=batch_size, bos=bos, keep_dtype=keep_dtype, device=device, progress=progress,
    )  # fmt: skip
    rows = []
    for index, plan in enumerate(plans, 1):
        _progress_line(index, len(plans), plan.name, progress)
        rows.append(measurement.measure(plan))
    rows.sort(key=lambda row: -row["weight_bytes"])
    return {
        **measurement.summary(),
        "rows": [measurement.reference_row, *rows],
        "verdict": verdict(rows, budgets),
    }


def _quantize_command(model: ModelLike, rung: Rung, calibration, window_length: int, keep_dtype) -> str:
    """The ``lowbit quantize`` command that makes ``rung`` as :func:`recipe` measured it."""
    source = "MODEL" if isinstance(model, nn.Module) else str(model)
    command = f"lowbit quantize {source} {rung.options()}"
    if rung.calibrated:
        if calibration is not None:
            command += f" --calibration {calibration}"
        if window_length != DEFAULT_WINDOW_LENGTH:
            command += f" --calibration-length {window_length}"
    if keep_dtype is not None:
        command += f" --keep-dtype {keep_dtype}"
    return command + " -o OUT"


def recipe(
    model: ModelLike = DEFAULT_MODEL,
    *,
    max_kl: float = QUALITY_BUDGETS["good"],
    data: str | os.PathLike | None = None,
    windows: int | None = None,
    window_length: int = DEFAULT_WINDOW_LENGTH,
    calibration: str | os.PathLike | None = None,
    batch_size: int = 1,
    bos: bool | None = None,
    keep_dtype: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """The no-fuss recipe as one call: walk the ladder on your text, stop at the first rung
    that meets ``max_kl``, and say how to make it.

    The ladder (``lowbit.eval.verdict.ladder``): ``int8`` first; when even it misses the
    budget, the walk stops with no answer (nothing smaller will do better). Then
    ``int4-g128``, ``int4-g128+clip`` and ``int4-g128`` with every other calibrated method
    lowbit has (``lowbit.method_names()``), stopping at the first that meets the budget;
    when none does, the answer is ``int8``. A rung meets the budget when its KL plus two
    standard errors across windows is below ``max_kl``.

    Returns the measurement's description (as :func:`compare`), ``max_kl``, ``rows`` (the
    reference, then each rung measured, in order), ``answer`` (the rung's label or None),
    ``command`` (the ``lowbit quantize`` command that reproduces it, or None) and ``advice``.
    """
    if not isinstance(max_kl, (int, float)) or isinstance(max_kl, bool) or not max_kl > 0:
        raise LowbitError(f"the KL budget must be a positive number, got {max_kl!r}")
    rungs = ladder()
    plans = [resolve_scheme(rung.scheme, rung.method) for rung in rungs]
    measurement = _Measurement(
        model, plans, data=data, windows=windows, window_length=window_length, calibration=calibration,
        batch_size=batch_size, bos=bos, keep_dtype=keep_dtype, device=device, progress=progress,
    )  # fmt: skip
    rows, answer = [], None
    for index, (rung, plan) in enumerate(zip(rungs, plans), 1):
        _progress_line(index, len(rungs), rung.label, progress)
        row = measurement.measure(plan)
        rows.append(row)
        if meets(row, max_kl):
            answer = rung
            if index > 1:
                break  # the first 4-bit rung that meets the budget
        elif index == 1:
            break  # even 8 bits misses it
    if answer is None:
        advice = f"even {rungs[0].label} misses KL {max_kl:g}: keep 16-bit weights (bf16), or try a bigger model at lower bits"
    elif answer is rungs[0]:
        advice = f"no 4-bit rung meets KL {max_kl:g}: {answer.label} is the smallest that does; a bigger model at 4 bits may beat this one at 8"
    else:
        advice = f"{answer.label} meets KL {max_kl:g}"
    return {
        **measurement.summary(),
        "max_kl": max_kl,
        "rows": [measurement.reference_row, *rows],
        "answer": None if answer is None else answer.label,
        "command": None if answer is None else _quantize_command(model, answer, calibration, window_length, keep_dtype),
        "advice": advice,
    }


def generate(
    model: ModelLike,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    chat: bool | None = None,
    device: str | torch.device | None = None,
) -> str:
    """Greedy continuation of ``prompt``; instruct models get their chat template (``chat=None``: auto).

    ``device``: where to run (default: where the model is; a model loaded here starts on the CPU).
    Quantized layers are dequantized once for the call (``lowbit.nn.dense_cache``: at most half
    the memory available; layers beyond it dequantize per token), so generating on a CPU runs
    near the float model's speed.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LowbitError(f"the number of new tokens must be a whole number of at least 1, got {max_new_tokens!r}")
    target = None if device is None else resolve_device(device)
    model, tokenizer = _model_and_tokenizer(model)
    if tokenizer is None:
        raise LowbitError("this model has no tokenizer to turn the prompt into tokens")
    if target is not None:
        model.to(target)
    use_chat = getattr(tokenizer, "chat_template", None) is not None if chat is None else chat
    if use_chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    model_device = next(model.parameters()).device
    # each quantized layer is dequantized once for the whole call, not once per token
    with torch.no_grad(), dense_cache(model):
        out = model.generate(
            input_ids=ids.to(model_device),
            attention_mask=torch.ones_like(ids).to(model_device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def inspect(path: str | os.PathLike) -> dict:
    """What a lowbit checkpoint, HF directory, GGUF file, or GPTQ / AWQ / compressed-tensors
    checkpoint holds, read from headers only."""
    if foreign_method(path) is not None:
        return inspect_foreign(path)
    return inspect_checkpoint(path)


def _size_config(spec: str | os.PathLike | dict) -> str | os.PathLike | dict:
    """What the sizing advisor reads for ``spec``: a config dict, a ``config.json`` or a
    directory holding one as they are; for a GGUF file (or the default model) the config its
    dequantized cache holds, else the one transformers reads from the file's metadata; for a
    hub id the config transformers fetches."""
    if isinstance(spec, dict):
        return spec
    path = Path(spec).expanduser()
    if (path.is_file() and path.suffix.lower() == ".json") or (path / "config.json").is_file():
        return spec
    source = resolve_model(spec)
    from transformers import AutoConfig

    if source.gguf_file:
        from lowbit.gguf_cache import entry_directory

        gguf_path = Path(source.path) / source.gguf_file
        cached = entry_directory(gguf_path) / "config.json"
        config = read_raw_config(cached) if cached.is_file() else AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file).to_dict()
        config.pop("dtype", None)  # the dequantized copy's float32 says nothing about the model
        return {**config, "_name_or_path": source.gguf_file}
    try:
        return {**AutoConfig.from_pretrained(source.path).to_dict(), "_name_or_path": source.path}
    except (OSError, ValueError) as error:
        raise LowbitError(f"could not read the config of {source.path!r} ({str(error).splitlines()[0]})") from None


def size(
    config_or_path: str | os.PathLike | dict,
    *,
    context: int = 4096,
    batch: int = 1,
    gpu_memory: str | int | None = None,
) -> dict:
    """Memory of the weights in every format, the KV cache, and whether it fits, from the
    config alone: a config dict, a ``config.json``, a model directory, a GGUF file, a hub id or
    ``smollm2-135m`` (no weight is read)."""
    from lowbit.advisor.sizing import parse_memory, size_report

    memory = parse_memory(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    return size_report(_size_config(config_or_path), context=context, batch=batch, gpu_memory=memory)
