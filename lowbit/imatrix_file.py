"""Importance-matrix files as llama.cpp writes and reads them: GGUF, and the legacy ``.dat``.

**GGUF** (what ``llama-imatrix`` writes since mid-2025, and what :func:`write_imatrix` writes):
no ``general.architecture``; ``general.type = "imatrix"``; ``imatrix.datasets`` (array of
strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32); per weight tensor
``NAME.in_sum2`` (F32, ggml shape ``[features, experts]``: the raw sums of x²) and
``NAME.counts`` (F32, ``[1, experts]``: tokens summed). ``llama-quantize`` refuses a GGUF
imatrix missing any of the three ``imatrix.*`` keys, and divides sums by counts.

**Legacy** (``--output-format dat``; still read by llama.cpp): int32 entry count; per entry an
int32 name length, the name, int32 ``ncall`` (chunks), int32 value count, float32 values
``(sum / count) * ncall``; then, optionally, int32 chunk count and an int32-length dataset
name. Read here so that importance ``values / ncall`` equals what llama.cpp uses (kept as
``sums = values``, ``counts = ncall``).

The GGUF file is written with gguf-py's ``GGUFWriter`` (llama.cpp's own Python writer), minus
its architecture key, as llama.cpp's ``convert_legacy_imatrix_to_gguf.py`` does. A GGUF file
is read only after lowbit's bounded header check (``sources.check_gguf``) has checked every
tensor against the file; the legacy reader checks every length against the bytes it has.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import torch

from lowbit.algorithms.imatrix import ImportanceEntry, ImportanceMatrix
from lowbit.errors import LowbitError
from lowbit.export.atomic import check_file_output, recover_leftovers
from lowbit.sources import GGUF_MAGIC, check_gguf

SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
KEY_DATASETS = gguf.Keys.IMatrix.DATASETS
KEY_CHUNK_COUNT = gguf.Keys.IMatrix.CHUNK_COUNT
KEY_CHUNK_SIZE = gguf.Keys.IMatrix.CHUNK_SIZE


class _ImatrixWriter(gguf.GGUFWriter):
    """gguf-py's writer without ``general.architecture``: an imatrix belongs to no architecture."""

    def add_architecture(self) -> None:
        pass


def check_imatrix_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output that cannot be written, or exists without ``overwrite``, before any work."""
    path = check_file_output(path)
    if path.exists() and not overwrite:
        raise LowbitError(f"{path} already exists; choose another output or pass --overwrite (overwrite=True)")
    return path


def write_imatrix(matrix: ImportanceMatrix, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``matrix`` as a GGUF imatrix at ``path`` (through a temporary file renamed into place)."""
    path = check_imatrix_output(path, overwrite)
    if not matrix.entries:
        raise LowbitError("the importance matrix has no entries to write")
    recover_leftovers(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.partial-{os.getpid()}"
    writer = _ImatrixWriter(temporary, arch="")
    try:
        writer.add_type(gguf.GGUFType.IMATRIX)
        # llama-quantize refuses a file without this key, and gguf-py writes no empty array
        writer.add_array(KEY_DATASETS, list(matrix.datasets) or ["(unnamed)"])
        writer.add_uint32(KEY_CHUNK_COUNT, int(matrix.chunk_count))
        writer.add_uint32(KEY_CHUNK_SIZE, int(matrix.chunk_size))
        for name in sorted(matrix.entries):  # llama.cpp's order: sorted names
            entry = matrix.entries[name]
            writer.add_tensor(name + SUMS_SUFFIX, entry.sums.detach().float().cpu().numpy())
            writer.add_tensor(name + COUNTS_SUFFIX, entry.counts.detach().float().cpu().numpy().reshape(-1, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        temporary.replace(path)
    except BaseException:
        writer.close()
        temporary.unlink(missing_ok=True)
        raise
    return path


def read_imatrix(path: str | os.PathLike) -> ImportanceMatrix:
    """An importance matrix from a GGUF imatrix or a legacy ``.dat`` file (told apart by the magic)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LowbitError(f"no such importance matrix file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return _read_gguf(path)
    return read_legacy_imatrix(path.read_bytes(), str(path))


def _read_gguf(path: Path) -> ImportanceMatrix:
    layout = check_gguf(path)
    bad = f"{path} is not a llama.cpp importance matrix"
    metadata = layout.metadata
    missing = [key for key in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if key not in metadata]
    if missing:  # llama-quantize refuses such a file too
        raise LowbitError(f"{bad}: it lacks the key(s) {', '.join(missing)}")
    tensors = {info.name: info for info in layout.tensors}
    names = sorted({name.removesuffix(SUMS_SUFFIX).removesuffix(COUNTS_SUFFIX) for name in tensors
                    if name.endswith((SUMS_SUFFIX, COUNTS_SUFFIX))})  # fmt: skip
    if not names:
        raise LowbitError(f"{bad}: it holds no {SUMS_SUFFIX} / {COUNTS_SUFFIX} tensors")
    data = np.memmap(path, mode="r")
    entries = {}
    for name in names:
        sums, counts = tensors.get(name + SUMS_SUFFIX), tensors.get(name + COUNTS_SUFFIX)
        if sums is None or counts is None:
            raise LowbitError(f"{bad}: {name} has sums without counts or counts without sums")
        if sums.ggml_type != gguf.GGMLQuantizationType.F32 or counts.ggml_type != gguf.GGMLQuantizationType.F32:
            raise LowbitError(f"{bad}: the sums and counts of {name} must be F32")
        experts = int(np.prod(counts.shape))
        if experts < 1 or int(np.prod(sums.shape)) % experts:
            raise LowbitError(f"{bad}: {name} has {int(np.prod(sums.shape))} sums, not a multiple of its {experts} counts")

        def values(info):
            return torch.from_numpy(np.array(data[info.offset : info.offset + info.nbytes].view("<f4")))

        entries[name] = ImportanceEntry(values(sums).reshape(experts, -1), values(counts).round())
    datasets = metadata.get(KEY_DATASETS)
    return ImportanceMatrix(
        entries, _strings(path, KEY_DATASETS) if datasets else [], _whole(metadata[KEY_CHUNK_COUNT]), _whole(metadata[KEY_CHUNK_SIZE])
    )


def _whole(value) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def _strings(path: Path, key: str) -> list[str]:
    """A string array's values (the header was checked by ``check_gguf``; gguf-py decodes it)."""
    field = gguf.GGUFReader(path).fields[key]
    if field.types[:1] != [gguf.GGUFValueType.ARRAY] or field.types[-1] != gguf.GGUFValueType.STRING:
        return []
    return list(field.contents())


def read_legacy_imatrix(data: bytes, name: str = "the importance matrix") -> ImportanceMatrix:
    """Parse llama.cpp's legacy ``.dat`` imatrix bytes; every length is checked against ``data``."""
    bad = f"{name} is neither a GGUF nor a legacy llama.cpp importance matrix"
    position = 0

    def take(fmt: str):
        nonlocal position
        try:
            values = struct.unpack_from("<" + fmt, data, position)
        except struct.error:
            raise LowbitError(f"{bad}: it ends early (truncated or corrupt)") from None
        position += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def raw(length: int) -> bytes:
        nonlocal position
        if length < 0 or length > len(data) - position:
            raise LowbitError(f"{bad}: a length of {length} bytes runs past its end (corrupt)")
        position += length
        return data[position - length : position]

    count = take("i")
    if count < 1 or count * 16 > len(data):
        raise LowbitError(f"{bad}: it claims {count} entries in {len(data)} bytes")
    entries = {}
    for _ in range(count):
        entry_name = raw(take("i")).decode("utf-8", errors="replace")
        ncall, values = take("ii")
        if values < 1:
            raise LowbitError(f"{bad}: entry {entry_name!r} has {values} values")
        sums = torch.from_numpy(np.frombuffer(raw(4 * values), dtype="<f4").copy())
        entries[entry_name] = ImportanceEntry(sums, torch.tensor([float(ncall)]))
    chunk_count, datasets = 0, []
    if position < len(data):  # the chunk count and dataset name are optional
        chunk_count = take("i")
        if position < len(data):
            length = take("i")
            if length > 0:
                datasets.append(raw(length).decode("utf-8", errors="replace"))
    return ImportanceMatrix(entries, datasets, chunk_count, 0)

