"""A model's skeleton, built from its config alone, and the checks of what fills it.

Loading a checkpoint (plain or quantized) and inspecting one both start from the modules a
config implies, with parameters on the meta device, so that every stored tensor can be
checked against the shape the model needs before a byte of it is read. This module is that
shared ground: the writer and reader of checkpoints (``export/``), the lazy loader and
``inspect`` all import it, and it imports none of them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import Format, format_from_spec, get_format


def empty_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The model's modules with parameters on the meta device and real buffers (rotary tables …).

    ``dtype`` defaults to the config's own. Nothing is allocated for the parameters, not even
    for a moment (a config claiming 70B parameters costs nothing), and nothing is
    initialised: the modules are built on the meta device, then each buffer is made real
    and computed by the model's own ``_init_weights``, as transformers' ``from_pretrained``
    does for the buffers a checkpoint does not hold.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype)
    owners = {}
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            module_name, _, attribute = name.rpartition(".")
            owner = model.get_submodule(module_name)
            owner._buffers[attribute] = torch.empty_like(buffer, device="cpu")
            owners[module_name] = owner
    for owner in owners.values():
        model._init_weights(owner)
    return model


def tensor_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Every state-dict tensor of the model as a group of the names sharing it (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    state_names = set(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name in state_names:  # persistent buffers only
            groups.setdefault(id(buffer), []).append(name)
    return [tuple(names) for names in groups.values()]


def manifest_format(entry: dict) -> Format:
    """A manifest entry's format: its typed ``spec`` when there is one (which must agree with
    the ``format`` name beside it), else its ``format`` name."""
    if not isinstance(entry, dict) or not isinstance(entry.get("format"), str):
        raise LowbitError(f"a manifest entry has no format name ({entry!r}); the checkpoint is corrupt")
    if "spec" not in entry:
        return get_format(entry["format"])
    try:
        fmt = format_from_spec(entry["spec"])
    except LowbitError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise LowbitError(f"a manifest entry's format spec {entry['spec']!r} is malformed ({error}); the checkpoint is corrupt") from None
    if entry.get("format") != fmt.name:
        raise LowbitError(
            f"a manifest entry names format {entry.get('format')!r} but its spec describes {fmt.name!r}; the checkpoint is corrupt"
        )
    return fmt


def check_parts(
    path: Path, name: str, fmt: Format, shape: tuple[int, int], parts: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> None:
    """A quantized module must hold exactly the parts its format stores, shapes and dtypes.

    ``parts`` maps each stored part name to its ``(shape, dtype)``: read from a file's header,
    so a wrong part is refused before it is loaded.
    """
    expected = fmt.part_layout(shape)
    if parts != expected:
        raise LowbitError(
            f"{path}: {name} should hold {fmt.name} parts {expected} for shape {shape}, "
            f"found {parts}; the checkpoint is corrupt"
        )


def check_stored_bytes(path: Path, name: str, fmt: Format, shape: tuple[int, int], stored: int) -> None:
    """A quantized module must hold exactly the bytes its format takes for its shape."""
    if stored != fmt.storage_bytes(shape):
        raise LowbitError(
            f"{path}: {name} holds {stored} bytes, but {fmt.name} of shape {shape} takes "
            f"{fmt.storage_bytes(shape)}; the checkpoint is corrupt"
        )
