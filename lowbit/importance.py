"""Compute a model's importance matrix (llama.cpp's imatrix) from calibration tokens.

What ``llama-imatrix`` measures, measured the same way: the unquantized model reads the
calibration chunks, and every weight matrix of every decoder layer accumulates, per input
channel, the sum of its inputs' squares and the number of tokens (``algorithms/imatrix.py``).
Entries are named as llama.cpp names the tensors (``gguf_names``), so ``llama-quantize
--imatrix`` finds them; like ``llama-imatrix`` without ``--process-output``, the output
projection (``lm_head``) is left out.

The model streams as the pipeline's does: the inputs of every decoder layer are captured
once, then one layer at a time is read from disk (a lazily loaded model), run on the
calibration hidden states with a hook on each linear, and released. Activations are those of
the float model all the way through, as llama.cpp's are.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.imatrix import ImportanceEntry, ImportanceMatrix
from lowbit.arch import decoder_layers
from lowbit.device import resolve_device
from lowbit.gguf_names import tensor_names
from lowbit.nn import dense_weight, is_linear
from lowbit.pipeline import LayerBlock, capture_layer_inputs, return_freed_memory


def _hook_linears(layer: nn.Module, prefix: str, names, device: torch.device, entries: dict) -> list:
    """One entry and one forward hook per linear of ``layer`` that llama.cpp has a name for."""
    handles = []
    for local, module in layer.named_modules():
        if not is_linear(module):
            continue
        name = names.get(prefix + local)
        if name is None:
            warnings.warn(f"{prefix + local} has no llama.cpp tensor name; it gets no importance entry", stacklevel=3)
            continue
        entry = entries[name] = ImportanceEntry.zeros(dense_weight(module).shape[1], device=device)
        handles.append(module.register_forward_hook(lambda _m, inputs, _o, e=entry: e.add(inputs[0])))
    return handles


@torch.no_grad()
def collect_importance(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    dataset: str = "",
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> ImportanceMatrix:
    """The importance matrix of ``model`` over ``tokens`` ``(chunks, chunk_size)``.

    ``dataset`` names the calibration text (``imatrix.datasets``). ``device`` is where each
    layer runs (default: CUDA when available). A lazily loaded model (``model.lowbit_weights``)
    has each layer read just before its turn and released after it: the model is spent.
    """
    device = resolve_device(device)
    layers_path, layers = decoder_layers(model)
    names = tensor_names(model.config.model_type, len(layers))
    lazy = getattr(model, "lowbit_weights", None)
    if lazy is not None:
        lazy.materialize_outside(f"{layers_path}.")
    state = capture_layer_inputs(model, layers_path, tokens, batch_size)
    entries: dict[str, ImportanceEntry] = {}
    for index, layer in enumerate(tqdm(layers, desc="importance matrix", unit="layer", disable=not progress)):
        prefix = f"{layers_path}.{index}."
        if lazy is not None:
            lazy.materialize(prefix)
        home = next(layer.parameters()).device
        layer.to(device)
        handles = _hook_linears(layer, prefix, names, device, entries)
        try:
            state.hidden = LayerBlock(index, layer, device, [], state).run()
        finally:
            for handle in handles:
                handle.remove()
        layer.to("meta" if lazy is not None else home)
        if lazy is not None:
            return_freed_memory()
    for entry in entries.values():
        entry.sums, entry.counts = entry.sums.cpu(), entry.counts.cpu()
    return ImportanceMatrix(entries, [dataset] if dataset else [], int(tokens.shape[0]), int(tokens.shape[1]))
