"""Weight formats: what a quantized number is, one module per family.

``get_format(name)`` is the one registry of names: each family module contributes a
``parse`` function that recognises its names (``int4-g128``, ``nf4-dq``, ``fp8-e5m2``,
``mxfp4``, ``bf16`` …) and builds the format. A format object is its own typed spec:
``fmt.spec()`` writes it as a JSON-able dict and :func:`format_from_spec` reads it back.
A new family is one module and one line in ``FAMILIES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from lowbit.errors import LowbitError, UnknownNameError
from lowbit.formats import floating, fp4, fp8, gguf_blocks, integer, nf4
from lowbit.formats.base import Format, ScaleGroups
from lowbit.formats.floating import FloatFormat, FloatParams
from lowbit.formats.fp4 import MXFP4Format, MXParams
from lowbit.formats.fp8 import FP8Format, FP8Params
from lowbit.formats.gguf_blocks import GGUFFormat, GGUFParams
from lowbit.formats.integer import IntegerFormat, IntegerParams
from lowbit.formats.nf4 import NF4Format, NF4Params

FAMILIES = (floating, integer, nf4, fp8, fp4, gguf_blocks)
#: the class of each ``spec()["family"]``
FORMAT_CLASSES: dict[str, type[Format]] = {
    cls.family: cls for cls in (FloatFormat, IntegerFormat, NF4Format, FP8Format, MXFP4Format, GGUFFormat)
}

#: Names shown to users as examples of what ``get_format`` accepts.
EXAMPLE_NAMES = (
    "fp32", "bf16", "fp16",
    "int8", "int8-tensor", "w8-g128 (int8-g128)", "int4-g128", "int4-g32", "int4-sym-g128", "int3-g128", "int2-g64",
    "nf4", "nf4-dq", "fp8", "fp8-e5m2", "fp8-tensor", "mxfp4", "gguf-q8_0", "gguf-q4_k", "gguf-iq4_xs",
)  # fmt: skip

NAME_GRAMMAR = (
    "int{2..8}[-sym|-asym][-g{N}|-ch|-tensor], nf4[-dq][-g{N}], fp8[-e4m3|-e5m2][-tensor], mxfp4, fp32, bf16, fp16, "
    "gguf-{q8_0|q4_0|q4_1|q5_0|q5_1|q2_k|q3_k|q4_k|q5_k|q6_k|iq4_nl|iq4_xs}"
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


def format_from_spec(spec: Mapping[str, Any]) -> Format:
    """The format that ``spec`` (a :meth:`Format.spec` dict) describes.

    The spec must hold exactly ``family``, ``name`` and the family's fields, and describe a
    format the name grammar accepts (so every range check of ``get_format`` applies);
    anything else raises LowbitError.
    """
    if not isinstance(spec, Mapping):
        raise LowbitError(f"a format spec is a mapping with 'family', 'name' and the format's fields, got {spec!r}")
    family = spec.get("family")
    cls = FORMAT_CLASSES.get(family) if isinstance(family, str) else None
    if cls is None:
        raise LowbitError(f"format spec {dict(spec)!r} has no known 'family'; families are {sorted(FORMAT_CLASSES)}")
    fields = [field.name for field in dataclasses.fields(cls)]
    expected = {"family", "name", *fields}
    if set(spec) != expected:
        raise LowbitError(f"format spec {dict(spec)!r} must have exactly the keys {sorted(expected)}")
    try:
        built = cls(**{field: spec[field] for field in fields})
        canonical = get_format(built.name) if isinstance(built.name, str) else None
    except (LowbitError, TypeError, ValueError):
        canonical = None
    if canonical is None or canonical != built or canonical.name != spec["name"]:
        raise LowbitError(f"format spec {dict(spec)!r} does not describe a valid format ({NAME_GRAMMAR})")
    return canonical


__all__ = [
    "EXAMPLE_NAMES",
    "FORMAT_CLASSES",
    "NAME_GRAMMAR",
    "FP8Format",
    "FP8Params",
    "FloatFormat",
    "FloatParams",
    "Format",
    "GGUFFormat",
    "GGUFParams",
    "IntegerFormat",
    "IntegerParams",
    "MXFP4Format",
    "MXParams",
    "NF4Format",
    "NF4Params",
    "ScaleGroups",
    "format_from_spec",
    "get_format",
]  # fmt: skip
