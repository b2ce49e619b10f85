"""Plan files in the manifest's list form, repeated patterns, raw truncated checkpoints,
float safetensors offsets, and lm_head quantized without statistics under calibration."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import yaml

import lowbit
from lowbit.errors import LowbitError
from lowbit.export.native import load_native
from lowbit.pipeline import quantize_model
from lowbit.plan import load_plan_file, make_rule, Plan, resolve_scheme
from lowbit.sources import check_safetensors
from tiny_models import tiny_model, tiny_tokens


def test_manifest_plan_is_a_plan_file(tmp_path):
    plan = resolve_scheme("int4-g32+clip")
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan.to_dict()))
    loaded = load_plan_file(path)
    assert [r.to_dict() for r in loaded.rules] == [r.to_dict() for r in plan.rules]


@pytest.mark.parametrize("suffix, text", [(".yaml", '"*": int8\n"*": nf4\n'), (".json", '{"*": "int8", "*": "nf4"}')])
def test_repeated_pattern_is_refused(tmp_path, suffix, text):
    path = tmp_path / f"plan{suffix}"
    path.write_text(text)
    with pytest.raises(LowbitError, match="appears twice"):
        load_plan_file(path)


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


def test_lm_head_without_statistics_warns():
    model = tiny_model("llama", tie_word_embeddings=False)
    plan = Plan([make_rule("*", "int4-g32+clip")])
    with pytest.warns(UserWarning, match="lm_head is outside the decoder layers"):
        quantize_model(copy.deepcopy(model), plan, calibration=tiny_tokens(4, 16), progress=False)
