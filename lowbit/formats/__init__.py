"""Weight formats: what a quantized number is, one module per family.

``get_format(name)`` is the one registry: each family module contributes a ``parse``
function that recognises its names (``int4-g128``, ``nf4-dq``, ``fp8-e5m2``, ``mxfp4``,
``bf16`` …) and builds the format. A new family is one module and one line in ``FAMILIES``.
"""

from __future__ import annotations

from functools import lru_cache

from lowbit.errors import LowbitError, UnknownNameError
from lowbit.formats import floating, fp4, fp8, integer, nf4
from lowbit.formats.base import Format, Groups

FAMILIES = (floating, integer, nf4, fp8, fp4)

#: Names shown to users as examples of what ``get_format`` accepts.
EXAMPLE_NAMES = (
    "fp32", "bf16", "fp16",
    "int8", "int8-tensor", "w8-g128 (int8-g128)", "int4-g128", "int4-g32", "int4-sym-g128", "int3-g128", "int2-g64",
    "nf4", "nf4-dq", "fp8", "fp8-e5m2", "fp8-tensor", "mxfp4",
)  # fmt: skip

NAME_GRAMMAR = (
    "int{2..8}[-sym|-asym][-g{N}|-ch|-tensor], nf4[-dq][-g{N}], fp8[-e4m3|-e5m2][-tensor], mxfp4, fp32, bf16, fp16"
)


@lru_cache(maxsize=None)
def get_format(name: str) -> Format:
    """The format called ``name``; a clear error listing the grammar if there is none."""
    key = name.strip().lower()
    for family in FAMILIES:
        try:
            found = family.parse(key)
        except ValueError as error:
            raise LowbitError(str(error)) from None
        if found is not None:
            return found
    raise UnknownNameError(f"unknown format {name!r}. Formats are named {NAME_GRAMMAR}.")


__all__ = ["Format", "Groups", "get_format", "EXAMPLE_NAMES", "NAME_GRAMMAR"]
