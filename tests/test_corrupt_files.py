"""Files that are damaged on disk: a checkpoint cut short, a safetensors header with float
offsets. Each is refused with a LowbitError that says so, before anything reads the data."""

from __future__ import annotations

import json
import struct

import pytest

import lowbit
from lowbit.errors import LowbitError
from lowbit.export.native import load_native
from lowbit.pipeline import quantize_model
from lowbit.plan import resolve_scheme
from lowbit.sources import check_safetensors
from tiny_models import tiny_model


def test_truncated_checkpoint_loaded_directly(tmp_path):
    model = quantize_model(tiny_model("llama"), resolve_scheme("int8"), progress=False)
    out = lowbit.save(model, tmp_path / "out")
    file = out / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(LowbitError, match="truncated or corrupt"):
        load_native(out)


def test_float_offsets_are_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(LowbitError, match="malformed entry"):
        check_safetensors(path)
