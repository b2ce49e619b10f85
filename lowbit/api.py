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
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from lowbit.algorithms import AlgorithmConfig
from lowbit.device import resolve_device
from lowbit.errors import LowbitError
from lowbit.export import export_model, get_exporter
from lowbit.export.atomic import check_output
from lowbit.inspection import inspect_checkpoint
from lowbit.nn import dense_cache
from lowbit.eval import bits_per_weight, evaluate_windows, reference_log_probs, weight_bytes
from lowbit.pipeline import plan_uses_statistics, quantize_model
from lowbit.plan import Plan, resolve_scheme
from lowbit.sources import (
    DEFAULT_MODEL,
    builtin_calibration_path,
    load_model,
    load_text,
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
    source = resolve_model(model)
    if source.kind == "native":
        from lowbit.export.native import load_native

        loaded, loaded_tokenizer = load_native(source.path)
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


def calibration_tokens(tokenizer, data: str | os.PathLike, samples: int = 128, length: int = 512, seed: int = 0) -> torch.Tensor:
    """``samples`` calibration windows of ``length`` tokens at random starts of the text in ``data``."""
    return random_windows(tokenize(tokenizer, load_text(data)), samples, length, seed)


def _calibration_for(plans: list[Plan], tokenizer, calibration, samples: int, length: int) -> torch.Tensor | None:
    """Token ids for the plans' algorithms that use statistics: the user's, else the built-in text."""
    if isinstance(calibration, torch.Tensor):
        return calibration
    if calibration is not None:
        return calibration_tokens(tokenizer, calibration, samples, length)
    if tokenizer is None or not any(plan_uses_statistics(plan) for plan in plans):
        return None
    return calibration_tokens(tokenizer, builtin_calibration_path(), BUILTIN_CALIBRATION_SAMPLES, length)


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
    progress: bool = True,
) -> nn.Module:
    """Quantize a model's linear layers as ``scheme`` says and return the transformers model.

    ``model`` is a loaded transformers causal LM (quantized in place, as ``load_in_4bit`` users
    expect) or anything :func:`load` takes. ``scheme`` is a preset (``int4-g128``, ``nf4-dq`` …),
    a format name, either with ``+clip``, a plan file, or a :class:`~lowbit.plan.Plan`.
    ``method`` runs the rules that name no algorithm: a name (``"rtn"``) or a typed config
    (``RTNConfig(clip_search=True)``); default RTN. ``calibration`` (a text file, or token ids ``(samples, length)``) feeds the algorithms that
    use activation statistics, such as the clipping search; when they are in the plan and no
    calibration is given, lowbit's built-in calibration text is used. ``device`` is where each
    layer is worked on (default: CUDA when available, else CPU).
    """
    plan = resolve_scheme(scheme, method)
    resolve_device(device)  # refuse a device the machine lacks before loading anything
    # a model given by path streams from disk: the pipeline reads one layer's weights at a time
    model, tokenizer = _model_and_tokenizer(model, tokenizer, lazy=True)
    tokens = _calibration_for([plan], tokenizer, calibration, calibration_samples, calibration_length)
    return quantize_model(
        model, plan, calibration=tokens, device=device, progress=progress, source=getattr(model, "lowbit_source", None)
    )


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
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``model`` to ``path`` in the layout of target ``to`` (``lowbit.export.exporter_names()``).

    A model lowbit has already quantized (in memory, or a lowbit checkpoint path) is written
    as it is. Any other model is quantized first with ``scheme`` (default ``int4-g128``),
    ``method`` and the calibration options of :func:`quantize`. The output is checked before any work, and
    written under a temporary name renamed into place. Returns a summary: ``path``,
    ``target``, ``quantized_now``, ``plan``, ``modules`` (quantized linears), ``quantization_seconds`` and the
    weight bytes and bits per weight before and after.
    """
    exporter = get_exporter(to)
    check_output(Path(path), overwrite)  # refuse before the slow part
    plan = None if scheme is None and method is None else resolve_scheme(scheme or DEFAULT_SCHEME, method)
    resolve_device(device)
    model, tokenizer = _model_and_tokenizer(model, tokenizer, lazy=True)
    before = _describe(model)
    quantized_now = getattr(model, "lowbit_manifest", None) is None
    if quantized_now:
        quantize(
            model, plan or resolve_scheme(DEFAULT_SCHEME), calibration=calibration, calibration_samples=calibration_samples,
            calibration_length=calibration_length, tokenizer=tokenizer, device=device, progress=progress,
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


def evaluation_windows(tokenizer, data: str | os.PathLike | None, windows: int | None, window_length: int) -> torch.Tensor:
    """Token windows for evaluation. ``data=None`` is the built-in sample; ``windows=None`` takes
    as many as the text holds, up to the dev protocol's 40."""
    tokens = tokenize(tokenizer, load_text(data))
    if windows is None:
        windows = max(1, min(DEFAULT_WINDOWS, tokens.numel() // window_length))
    return token_windows(tokens, windows, window_length)


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
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity (and, with a reference, KL and top-1 agreement), weight memory and speed.

    Keys: ``perplexity``, ``kl_divergence``, ``top1_agreement``, ``weight_bytes``,
    ``bits_per_weight``, ``tokens_per_second``, ``windows``, ``window_length``, and how it was
    measured (``data``, ``dtype``, ``device``, ``bos``). ``device``: where the models run
    (moved there); by default where they are (the CPU for a model loaded from a path).
    """
    target = None if device is None else resolve_device(device)  # refuse a missing device before loading
    model, tokenizer = _model_and_tokenizer(model, tokenizer)
    if reference is not None:
        reference, _ = _model_and_tokenizer(reference)
    if target is not None:
        model.to(target)
        if reference is not None:
            reference.to(target)
    token_windows_ = evaluation_windows(tokenizer, data, windows, window_length)
    result = evaluate_windows(model, token_windows_, reference, batch_size, progress)
    return {**result, **_describe(model), "data": str(data or "built-in sample"), "bos": False}


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


def compare(
    model: ModelLike = DEFAULT_MODEL,
    schemes: list[str] | tuple[str, ...] = DEFAULT_SCHEMES,
    *,
    data: str | os.PathLike | None = None,
    windows: int | None = None,
    window_length: int = DEFAULT_WINDOW_LENGTH,
    calibration: str | os.PathLike | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Quantize ``model`` to each scheme and measure each against the unquantized model.

    Returns ``{"model", "reference", "rows", "data", ...}``; each row has ``scheme``,
    ``bits_per_weight``, ``weight_bytes``, ``perplexity``, ``kl_divergence``,
    ``top1_agreement``, ``kl_max_rest_mass``, ``quantization_seconds`` and
    ``tokens_per_second``. The reference is kept compactly (its top tokens per position:
    ``lowbit.eval.quality``), and each scheme quantizes a copy sharing the float model's
    tensors: memory holds the float model once plus one quantized model at a time.
    """
    plans = [resolve_scheme(s) for s in schemes]  # refuse a bad scheme before any heavy work
    base, tokenizer = _model_and_tokenizer(model)
    if getattr(base, "lowbit_manifest", None) is not None:
        raise LowbitError("compare needs an unquantized model to quantize and to measure against")
    token_windows_ = evaluation_windows(tokenizer, data, windows, window_length)
    calibration_ids = _calibration_for(plans, tokenizer, calibration, 128, window_length)
    reference = reference_log_probs(base, token_windows_, batch_size, progress)
    reference_row = {"scheme": f"reference ({_describe(base)['dtype']})", **_describe(base)}
    reference_row.update(evaluate_windows(base, token_windows_, reference, batch_size, progress))
    reference_row["quantization_seconds"] = None
    rows = [reference_row]
    for plan in plans:
        candidate = _sharing_copy(base)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a calibration note per scheme would only repeat
            quantize_model(candidate, plan, calibration=calibration_ids, device=device, progress=progress)
        seconds = time.perf_counter() - start
        row = {"scheme": plan.name, **_describe(candidate), "quantization_seconds": seconds}
        row.update(evaluate_windows(candidate, token_windows_, reference, batch_size, progress))
        rows.append(row)
        del candidate
    return {
        "model": getattr(base, "lowbit_source", type(base).__name__),
        "data": str(data or "built-in sample"),
        "windows": int(token_windows_.shape[0]),
        "window_length": int(token_windows_.shape[1]),
        "calibration": None if calibration_ids is None else str(calibration or "built-in calibration text"),
        "bos": False,
        "rows": rows,
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
    """What a lowbit checkpoint, HF directory or GGUF file holds, read from headers only."""
    return inspect_checkpoint(path)


def size(
    config_or_path: str | os.PathLike | dict,
    *,
    context: int = 4096,
    batch: int = 1,
    gpu_memory: str | int | None = None,
) -> dict:
    """Memory of the weights in every format, the KV cache, and whether it fits (config alone)."""
    from lowbit.advisor.sizing import parse_memory, size_report

    memory = parse_memory(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    return size_report(config_or_path, context=context, batch=batch, gpu_memory=memory)
