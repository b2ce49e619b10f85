"""The geometry of llama.cpp's tensor types, as data.

A ggml type stores a row in blocks: ``block_size`` weights take ``block_bytes`` bytes (the
``sizeof`` of the ``block_*`` struct in ggml-common.h), so a row must be a multiple of the
block. ``type_id`` is the number a GGUF file writes for the type (``ggml_type``, gguf-py's
``GGMLQuantizationType``). ``TENSOR_TYPE_FALLBACK`` is what ``llama-quantize`` uses instead
when a row is not a multiple of the block (``tensor_type_fallback`` in src/llama-quant.cpp);
when the fallback's block does not divide the row either, it writes F16 (a 32-block type
whose block does not divide the row goes to F16 directly). Checked against
``tensor_type_fallback`` of llama-cpp-python 0.3.36's vendored llama.cpp.

Geometry only: the types themselves (quantize, dequantize, the struct bytes) are the GGUF
block formats, ``gguf_blocks.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GgmlType:
    """A ggml tensor type: ``block_size`` weights of a row take ``block_bytes`` bytes."""

    name: str
    type_id: int
    block_size: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_size


GGML_TYPES: dict[str, GgmlType] = {
    t.name: t
    for t in (
        GgmlType("F32", 0, 1, 4),
        GgmlType("F16", 1, 1, 2),
        GgmlType("BF16", 30, 1, 2),
        GgmlType("Q4_0", 2, 32, 18),  # fp16 scale, 32 x 4 bits
        GgmlType("Q4_1", 3, 32, 20),  # fp16 scale and min, 32 x 4 bits
        GgmlType("Q5_0", 6, 32, 22),  # fp16 scale, 32 fifth bits, 32 x 4 bits
        GgmlType("Q5_1", 7, 32, 24),  # fp16 scale and min, 32 fifth bits, 32 x 4 bits
        GgmlType("Q8_0", 8, 32, 34),  # fp16 scale, 32 x 8 bits
        GgmlType("Q2_K", 10, 256, 84),  # 16 packed 4-bit scale/min pairs, 256 x 2 bits, fp16 d and dmin
        GgmlType("Q3_K", 11, 256, 110),  # 256 high bits, 256 x 2 bits, 16 x 6-bit scales, fp16 d
        GgmlType("Q4_K", 12, 256, 144),  # fp16 d and dmin, 8 x 6-bit scale/min pairs, 256 x 4 bits
        GgmlType("Q5_K", 13, 256, 176),  # as Q4_K plus 256 fifth bits
        GgmlType("Q6_K", 14, 256, 210),  # 256 x 4 low bits, 256 x 2 high bits, 16 x 8-bit scales, fp16 d
        GgmlType("IQ4_NL", 20, 32, 18),  # fp16 scale, 32 x 4-bit indices into a non-linear table
        GgmlType("IQ4_XS", 23, 256, 136),  # fp16 d, 8 x 6-bit scales, 256 x 4-bit non-linear indices
    )
}

#: ``tensor_type_fallback``: the type written when a row is not a multiple of the block.
TENSOR_TYPE_FALLBACK: dict[str, str] = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL",
}
