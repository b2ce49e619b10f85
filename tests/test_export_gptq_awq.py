"""GPTQ (v1 / v2 zeros) and AWQ GEMM exports, checked against the runtimes' own dequantization.

- GPTQ: :func:`gptq_reference` is GPTQModel's torch dequantization (``BaseQuantLinear.dequantize_weight``
  for 2/4/8 bits: shift each int32 word by ``arange(0, 32, bits)``, mask, ``+ 1`` to v1 zeros,
  ``scales[g_idx] * (w - zeros[g_idx])``), written from its source with word arithmetic of its
  own (no byte streams), so it shares nothing with lowbit's packing.
- AWQ: compressed-tensors' ``AutoAWQConverter`` (the package's own reader of AutoAWQ GEMM
  checkpoints) unpacks our files.
- The heavy test loads our exports with GPTQModel itself (torch backend, CPU) in a separate
  environment: ``LOWBIT_GPTQMODEL_PYTHON=/path/to/venv/bin/python`` (``pip install gptqmodel``
  pulls a CUDA torch build of several GB, so it is not a test dependency).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model, tiny_tokens

import lowbit
from lowbit.errors import LowbitError
from lowbit.export import gptq as gptq_export
from lowbit.export.int_layouts import AWQ_ORDER, pack_int32, unpack_int32
from lowbit.nn import quantized_linears
from lowbit.plan import Plan, make_rule

SHAPES = {"intermediate_size": 192}


def quantized(scheme, **overrides):
    return lowbit.quantize(tiny_model("llama", **{**SHAPES, **overrides}), scheme, progress=False)


def export(model, out: Path, to: str) -> tuple[dict, dict]:
    lowbit.export(model, out, to=to, progress=False)
    return load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text())["quantization_config"]


def gptq_reference(tensors: dict, name: str, bits: int, v1: bool) -> torch.Tensor:
    """GPTQModel's torch dequantization of one module (2, 4, 8 bits): float32 ``(out, in)``."""
    qweight, qzeros, scales, g_idx = (tensors[f"{name}.{part}"] for part in ("qweight", "qzeros", "scales", "g_idx"))
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    maxq = 2**bits - 1
    zeros = torch.bitwise_and(qzeros.unsqueeze(2) >> shifts, maxq).reshape(qzeros.shape[0], -1)
    if v1:
        zeros = zeros + 1
    weight = torch.bitwise_and(qweight.unsqueeze(1) >> shifts.view(1, -1, 1), maxq).reshape(-1, qweight.shape[1])
    g = g_idx.long()
    return (scales.float()[g] * (weight.float() - zeros.float()[g])).t()


def awq_reference(tensors: dict, name: str, group_size: int) -> torch.Tensor:
    """compressed-tensors' AutoAWQ converter's reading of one module, dequantized: float32 ``(out, in)``."""
    from compressed_tensors.entrypoints.convert.converters.autoawq import (
        AutoAWQConverter,
    )

    converter = AutoAWQConverter(bits=4, group_size=group_size)
    weight, scale, zero = converter._convert_gemm_module(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], tensors[f"{name}.qzeros"])
    index = torch.arange(weight.shape[1]) // group_size
    return (weight.float() - zero.float()[:, index]) * scale.float()[:, index]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("order", [None, AWQ_ORDER])
def test_int32_packing_is_the_lsb_first_bit_stream(bits, order):
    """pack_int32 against a bit-by-bit construction of the words (3-, 5-, 6-, 7-bit codes straddle words)."""
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 40), generator=generator, dtype=torch.uint8)
    words = pack_int32(codes, bits, order)
    for row in range(3):
        ordered = codes[row].reshape(-1, 8)[:, list(order)].reshape(-1) if order else codes[row]
        stream = sum(int(code) << (i * bits) for i, code in enumerate(ordered.tolist()))
        expected = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(words.shape[1])]
        assert [w & 0xFFFFFFFF for w in words[row].tolist()] == expected
    assert words.shape[1] == (40 * bits + 31) // 32
    assert torch.equal(unpack_int32(words, bits, 40, order), codes)


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-sym-g32", "int8-asym-g48", "int2-ch", "int4-tensor"])
@pytest.mark.parametrize("target", ["gptq", "gptq-v2"])
def test_gptq_export_dequantizes_as_gptqmodel_does(tmp_path, scheme, target):
    model = quantized(scheme)
    tensors, config = export(model, tmp_path / "out", target)
    assert config["checkpoint_format"] == {"gptq": "gptq", "gptq-v2": "gptq_v2"}[target]
    assert json.loads((tmp_path / "out" / "quantize_config.json").read_text()) == config
    for name, module in quantized_linears(model).items():
        out, columns = module.out_features, module.in_features
        assert tensors[f"{name}.qweight"].shape == (columns * module.format.bits // 32, out)
        assert tensors[f"{name}.scales"].dtype == torch.float16 and tensors[f"{name}.g_idx"].dtype == torch.int32
        reference = gptq_reference(tensors, name, module.format.bits, v1=target == "gptq")
        assert torch.equal(reference, module.dequantize_weight(torch.float32)), name


def test_the_zero_convention_matters_both_ways(tmp_path):
    """Reading v2 zeros as v1 (or the reverse) shifts every weight by a step: the "!!!!" bug."""
    model = quantized("int4-g32")
    name, module = next(iter(quantized_linears(model).items()))
    v1, _ = export(model, tmp_path / "v1", "gptq")
    v2, _ = export(model, tmp_path / "v2", "gptq-v2")
    exact = module.dequantize_weight(torch.float32)
    assert torch.equal(gptq_reference(v1, name, 4, v1=True), exact)
    assert torch.equal(gptq_reference(v2, name, 4, v1=False), exact)
    assert not torch.allclose(gptq_reference(v2, name, 4, v1=True), exact, atol=1e-3)
    assert not torch.allclose(gptq_reference(v1, name, 4, v1=False), exact, atol=1e-3)


def test_a_zero_point_of_zero_needs_v2(tmp_path):
    model = tiny_model("llama", **SHAPES)
    with torch.no_grad():  # one group of only positive weights: its asymmetric zero point is 0
        model.model.layers[0].mlp.up_proj.weight[:, :32] = model.model.layers[0].mlp.up_proj.weight[:, :32].abs()
    model = lowbit.quantize(model, "int4-g32", progress=False)
    with pytest.raises(LowbitError, match="zero point 0.*--to gptq-v2"):
        export(model, tmp_path / "v1", "gptq")
    assert not (tmp_path / "v1").exists()
    tensors, _ = export(model, tmp_path / "v2", "gptq-v2")
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(gptq_reference(tensors, name, 4, v1=False), model.get_submodule(name).dequantize_weight(torch.float32))


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-sym-g48"])
def test_awq_export_reads_back_through_compressed_tensors_awq_converter(tmp_path, scheme):
    model = quantized(scheme)
    tensors, config = export(model, tmp_path / "out", "awq")
    assert config == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": int(scheme.split("g")[-1]),
                      "zero_point": True, "modules_to_not_convert": None}  # fmt: skip
    for name, module in quantized_linears(model).items():
        assert tensors[f"{name}.qweight"].shape == (module.in_features, module.out_features // 8)
        assert torch.equal(awq_reference(tensors, name, config["group_size"]), module.dequantize_weight(torch.float32)), name


@pytest.mark.parametrize(
    "target,scheme,message",
    [
        ("gptq", "nf4", "gptq cannot carry nf4 .*: it stores integer weights only; native"),
        ("awq", "int8", "awq cannot carry int8 .*: its runtimes run 4-bit weights"),
        ("awq", "int4", "awq cannot carry int4 .*: it needs a group size"),
        ("gptq", "int4-g64", "96 input features are not a whole number of groups of 64"),
        ("awq", "int5-g32", "awq cannot carry int5-g32"),
    ],
)
def test_what_the_target_cannot_carry_is_refused(tmp_path, target, scheme, message):
    with pytest.raises(LowbitError, match=message):
        export(quantized(scheme), tmp_path / "out", target)
    assert not list(tmp_path.iterdir())


def test_single_format_targets_refuse_mixed_plans_and_dense_block_linears(tmp_path):
    mixed = quantized(Plan([make_rule("*.mlp.*", "int8-g32"), make_rule("*", "int4-g32")], name="mixed"))
    with pytest.raises(LowbitError, match="one bit width and group size per model.*compressed-tensors"):
        export(mixed, tmp_path / "out", "gptq")
    partial = quantized(Plan([make_rule("*.mlp.down_proj", "keep"), make_rule("*", "int4-g32")], name="partial"))
    with pytest.raises(LowbitError, match="stayed unquantized.*compressed-tensors"):
        export(partial, tmp_path / "out", "awq")


def test_existing_output_and_interrupted_export_leave_nothing_changed(tmp_path, monkeypatch):
    model = quantized("int4-g32")
    out = tmp_path / "out"
    export(model, out, "gptq")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(LowbitError, match="already exists"):
        export(model, out, "gptq-v2")
    assert sorted(p.name for p in out.iterdir()) == before

    calls = []

    def failing(module, v2):
        calls.append(module)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C in the middle of the modules
        return real(module, v2)

    real = gptq_export.convert
    monkeypatch.setattr(gptq_export, "convert", failing)
    with pytest.raises(KeyboardInterrupt):
        export(model, tmp_path / "second", "gptq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no output, no partial directory


@pytest.mark.parametrize("target", ["gptq", "awq", "compressed-tensors"])
def test_overwrite_replaces_our_own_export_but_not_a_foreign_directory(tmp_path, target):
    model = quantized("int4-sym-g32")
    out = tmp_path / "out"
    export(model, out, target)
    lowbit.export(model, out, to=target, overwrite=True, progress=False)  # our own output: replaced
    assert (out / "config.json").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LowbitError):
        lowbit.export(model, foreign, to=target, overwrite=True, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json"]


def test_a_sharded_export_streams_and_reads_back(tmp_path, monkeypatch):
    """Shards written tensor by tensor (export/repack.py's own safetensors writer) are read by
    safetensors itself, and the index names every tensor's file."""
    from lowbit.export import repack

    monkeypatch.setattr(repack, "MAX_SHARD_BYTES", 20_000)
    model = quantized("int4-g32")
    lowbit.export(model, tmp_path / "out", to="gptq-v2", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (tmp_path / "out" / "model.safetensors").exists()
    tensors = {}
    for file in files:
        loaded = load_file(tmp_path / "out" / file)
        data = sum(t.numel() * t.element_size() for t in loaded.values())
        assert data <= 20_000 or len(loaded) == 1  # only a tensor larger than a shard has one of its own
        assert {key for key, where in index["weight_map"].items() if where == file} == set(loaded)
        tensors.update(loaded)
    for name, module in quantized_linears(model).items():
        assert torch.equal(gptq_reference(tensors, name, 4, v1=False), module.dequantize_weight(torch.float32))
    assert torch.equal(tensors["model.norm.weight"], model.model.norm.weight)
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "out")(tiny_tokens()).logits, model(tiny_tokens()).logits)


GPTQMODEL_SCRIPT = """
import sys, torch
from gptqmodel import GPTQModel, BACKEND
model = GPTQModel.load(sys.argv[1], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits.float(), sys.argv[3])
"""


@pytest.mark.heavy
@pytest.mark.parametrize("target,scheme", [("gptq", "int4-sym-g32"), ("gptq", "int8-sym-g32"), ("gptq-v2", "int4-g32"),
                                           ("gptq-v2", "int2-g32"), ("awq", "int4-g32")])  # fmt: skip
def test_gptqmodel_loads_our_export(tmp_path, byte_tokenizer, target, scheme):
    python = os.environ.get("LOWBIT_GPTQMODEL_PYTHON")
    if not python:
        pytest.skip("set LOWBIT_GPTQMODEL_PYTHON to a python with gptqmodel installed (pip install gptqmodel)")
    model = quantized(scheme)
    out = tmp_path / "out"
    lowbit.export(model, out, to=target, tokenizer=byte_tokenizer, progress=False)
    tokens = tiny_tokens()
    torch.save(tokens, tmp_path / "tokens.pt")

    def run(directory: Path) -> torch.Tensor:
        subprocess.run([python, "-c", GPTQMODEL_SCRIPT, str(directory), str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt")],
                       check=True, cwd=tmp_path, capture_output=True, timeout=600)  # fmt: skip
        return torch.load(tmp_path / "logits.pt")

    with torch.no_grad():
        expected = model(tokens).logits
    error = (run(out) - expected).abs().max()
    assert error < 0.01 * expected.abs().max()  # GPTQModel's torch backend computes in float16
    if target.startswith("gptq"):  # the same file declared with the other zero convention is far off
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"]["checkpoint_format"] = "gptq_v2" if target == "gptq" else "gptq"
        (out / "config.json").write_text(json.dumps(config))
        (out / "quantize_config.json").write_text(json.dumps(config["quantization_config"]))
        try:
            assert (run(out) - expected).abs().max() > 3 * error
        except subprocess.CalledProcessError as refused:  # GPTQModel reads asymmetric v1 only from itself
            assert b"sym=False model with format=FORMAT.GPTQ" in refused.stderr
