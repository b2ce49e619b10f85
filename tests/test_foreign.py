"""Reading GPTQ, AWQ and compressed-tensors checkpoints made elsewhere (``lowbit/export/foreign.py``).

- Round trip: our export of each target, read back, gives bit-identical logits (and re-exports).
- A checkpoint written by compressed-tensors' own compressor (``PackedQuantizationCompressor.compress``
  from lowbit's dequantized weights, scales and zeros) is read into lowbit with lowbit's logits.
- A config that lies (bits, group size, zero convention, act-order) is caught from the tensors'
  shapes or values with a clear error; ``lowbit.load`` / ``inspect`` / the CLI take these directories.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model, tiny_tokens

import lowbit
from lowbit.errors import LowbitError
from lowbit.export.foreign import load_foreign
from lowbit.export.int_layouts import int_weight
from lowbit.nn import quantized_linears

SHAPES = {"intermediate_size": 192}


def quantized(scheme, arch="llama"):
    return lowbit.quantize(tiny_model(arch, **SHAPES), scheme, progress=False)


def logits(model):
    with torch.no_grad():
        return model(tiny_tokens()).logits


def edit_config(out: Path, **changes) -> None:
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"].update(changes)
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "target,scheme,arch",
    [("gptq", "int4-g32", "llama"), ("gptq-v2", "int2-g48", "qwen2"), ("gptq", "int8", "qwen2"), ("awq", "int4-sym-g32", "llama"),
     ("compressed-tensors", "int3-g32", "qwen2"), ("compressed-tensors", "int4-sym-g48", "llama")],
)  # fmt: skip
def test_our_exports_read_back_bit_identically(tmp_path, target, scheme, arch):
    model = quantized(scheme, arch)
    lowbit.export(model, tmp_path / "out", to=target, progress=False)
    loaded = lowbit.load(tmp_path / "out")
    assert set(quantized_linears(loaded)) == set(quantized_linears(model))
    for name, module in quantized_linears(model).items():
        assert torch.equal(loaded.get_submodule(name).dequantize_weight(torch.float32), module.dequantize_weight(torch.float32))
    assert torch.equal(logits(loaded), logits(model))
    report = lowbit.inspect(tmp_path / "out")
    assert report["kind"] == target.split("-v2")[0] and any(name.startswith(report["kind"] + ":") for name in report["formats"])
    lowbit.export(loaded, tmp_path / "again", to="native", progress=False)  # a foreign model converts like any other
    assert torch.equal(logits(lowbit.load(tmp_path / "again")), logits(model))


def test_a_checkpoint_made_by_compressed_tensors_loads_with_lowbits_logits(tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationScheme

    model = quantized("int4-g48", "qwen2")
    lowbit.export(model, tmp_path / "ours", to="compressed-tensors", progress=False)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    scheme = QuantizationScheme.model_validate(config["quantization_config"]["config_groups"]["group_0"])
    tensors = {key: t for key, t in load_file(tmp_path / "ours" / "model.safetensors").items()}
    for name, module in quantized_linears(model).items():  # the package quantizes lowbit's weights itself
        for part in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
            tensors.pop(f"{name}.{part}")
        weight = int_weight(module)
        state = {"weight": module.dequantize_weight(torch.float32), "weight_scale": weight.scale.float(),
                 "weight_zero_point": (weight.zero.to(torch.int16) - 8).to(torch.int8)}  # fmt: skip
        for part, tensor in PackedQuantizationCompressor.compress(state, scheme).items():
            tensors[f"{name}.{part}"] = tensor
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    save_file(tensors, theirs / "model.safetensors", metadata={"format": "pt"})
    del config["lowbit_export"]
    (theirs / "config.json").write_text(json.dumps(config))
    loaded, _ = load_foreign(theirs)
    assert torch.equal(logits(loaded), logits(model))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, byte_tokenizer):
    """One export per target of the same asymmetric int4-g32 model, and a symmetric one."""
    base = tmp_path_factory.mktemp("foreign")
    asym, sym = quantized("int4-g32"), quantized("int4-sym-g32")
    paths = {}
    for target in ("gptq", "gptq-v2", "awq", "compressed-tensors"):
        lowbit.export(asym, base / target, to=target, tokenizer=byte_tokenizer, progress=False)
        paths[target] = base / target
    lowbit.export(sym, base / "gptq-sym", to="gptq", progress=False)
    paths["gptq-sym"] = base / "gptq-sym"
    return paths


def copy_of(exports, target: str, tmp_path: Path) -> Path:
    out = tmp_path / target
    out.mkdir()
    for file in exports[target].iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    return out


@pytest.mark.parametrize(
    "target,changes,message",
    [
        ("gptq", {"bits": 8}, r"qweight has shape \[\d+, \d+\], but the config \(8 bits.*qweight implies 4 bits"),
        ("gptq", {"group_size": 64}, r"has shape \[\d+, \d+\], but the config \(4 bits, group size 64\).*group size of 32"),
        ("gptq", {"group_size": -1}, r"has shape \[\d+, \d+\], but the config \(4 bits, group size per channel\)"),
        ("awq", {"group_size": 96}, r"scales imply a group size of 32"),
        ("compressed-tensors", {"config_groups": {"g": {"targets": ["Linear"], "format": "pack-quantized",
            "weights": {"num_bits": 2, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}}}},
         r"weight_packed implies 4 bits"),
        ("gptq", {"desc_act": True}, "act-order"),
        ("gptq", {"bits": "four"}, "bits is 'four'"),
        ("gptq", {"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not read"),
    ],
)  # fmt: skip
def test_a_config_that_lies_about_the_tensors_is_refused(exports, tmp_path, target, changes, message):
    out = copy_of(exports, target, tmp_path)
    edit_config(out, **changes)
    with pytest.raises(LowbitError, match=message):
        lowbit.load(out)
    if "act-order" not in message and "is not read" not in message and "'four'" not in message:
        with pytest.raises(LowbitError, match=message):
            lowbit.inspect(out)


def test_a_wrong_zero_convention_is_caught(exports, tmp_path):
    """Symmetric: every zero must be 2**(bits-1), so v1 read as v2 (7) or v2 as v1 (9) is caught."""
    sym = copy_of(exports, "gptq-sym", tmp_path)
    edit_config(sym, checkpoint_format="gptq_v2")
    with pytest.raises(LowbitError, match="zero convention is wrong"):
        lowbit.load(sym)
    # asymmetric: a v2 file declared v1 is caught when a zero would become 2**bits (an all-negative group)
    model = tiny_model("llama", **SHAPES)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :32] = -model.model.layers[0].mlp.up_proj.weight[:, :32].abs()
    model = lowbit.quantize(model, "int4-g32", progress=False)
    lowbit.export(model, tmp_path / "v2", to="gptq-v2", progress=False)
    edit_config(tmp_path / "v2", checkpoint_format="gptq")
    with pytest.raises(LowbitError, match="outside 0..15.*zero convention is wrong"):
        lowbit.load(tmp_path / "v2")


def test_a_permuted_g_idx_is_refused(exports, tmp_path):
    out = copy_of(exports, "gptq", tmp_path)
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="act-order g_idx"):
        lowbit.load(out)


def test_missing_and_mistyped_tensors_are_refused(exports, tmp_path):
    out = copy_of(exports, "awq", tmp_path)
    tensors = load_file(out / "model.safetensors")
    tensors.pop("model.layers.1.mlp.down_proj.qzeros")
    tensors["model.layers.0.mlp.up_proj.scales"] = tensors["model.layers.0.mlp.up_proj.scales"].float()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="up_proj.scales is F32|down_proj lacks qzeros"):
        lowbit.load(out)


def test_the_cli_inspects_and_evaluates_a_foreign_checkpoint(exports, eval_text_file):
    run = [sys.executable, "-m", "lowbit"]
    shown = subprocess.run([*run, "inspect", str(exports["gptq"])], capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "gptq:int4-g32" in shown.stdout
    evaluated = subprocess.run([*run, "eval", str(exports["awq"]), "--data", str(eval_text_file), "--windows", "1",
                                "--window-length", "32"], capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert "perplexity" in evaluated.stdout.lower()


PEER_PYTHON = Path(__file__).resolve().parents[1] / ".venv-peers" / "llmcompressor" / "bin" / "python"
LLMCOMPRESSOR_SCRIPT = """
import sys, torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
source, out, symmetric = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": 32}
oneshot(model=model, recipe=QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]))
dense = {}
with torch.no_grad():
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is not None and hasattr(module, "weight_scale"):
            zero = getattr(module, "weight_zero_point", None)
            dense[name] = fake_quantize(module.weight, module.weight_scale, zero, module.quantization_scheme.weights).float().contiguous()
model.save_pretrained(out, save_compressed=True)
save_file(dense, out + ".dense.safetensors")
"""


@pytest.mark.heavy
@pytest.mark.parametrize("symmetric", [True, False])
def test_a_checkpoint_llm_compressor_made_loads_with_its_weights(tmp_path, byte_tokenizer, symmetric):
    """llm-compressor 0.14 (RTN W4A16 g32, bf16 model) writes a real compressed-tensors checkpoint;
    lowbit reads it into QuantLinears whose weights are llm-compressor's own fake-quantized ones."""
    if not PEER_PYTHON.exists():
        pytest.skip(f"llm-compressor's environment {PEER_PYTHON} is not there (bench/foundation.py makes it)")
    source = tmp_path / "float"
    tiny_model("llama", **SHAPES).to(torch.bfloat16).save_pretrained(source)
    byte_tokenizer.save_pretrained(source)
    out = tmp_path / "ct"
    subprocess.run([str(PEER_PYTHON), "-c", LLMCOMPRESSOR_SCRIPT, str(source), str(out), "1" if symmetric else "0"],
                   check=True, capture_output=True, timeout=900)  # fmt: skip
    dense = load_file(str(out) + ".dense.safetensors")
    model = lowbit.load(out)
    assert set(quantized_linears(model)) == set(dense)
    for name, module in quantized_linears(model).items():
        assert module.format.name == ("int4-sym-g32" if symmetric else "int4-g32")
        # llm-compressor's fake-quantized weight comes back in the model's bf16: ours rounded the same way
        assert torch.equal(module.dequantize_weight(torch.float32).to(torch.bfloat16).float(), dense[name]), name
