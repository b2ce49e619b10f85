"""lowbit inside transformers: ``from_pretrained`` of a lowbit checkpoint (lazily, bit-exact with
``lowbit.load``), quantization while loading (bit-exact with ``lowbit.quantize``), packed memory
footprints, ``save_pretrained`` round trips, generation, and a plain transformers load (lowbit
not imported) that stops with a message instead of returning random weights."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.nn import QuantLinear, quantized_linears
from tiny_models import tiny_model, tiny_tokens


def _saved(tmp_path, arch: str, scheme, name: str = "out", **kwargs):
    """``(lowbit checkpoint dir, source dir)`` of a tiny ``arch`` model quantized to ``scheme``."""
    source = tmp_path / f"{arch}-src"
    if not source.exists():
        tiny_model(arch).save_pretrained(source)
    lowbit.save(lowbit.quantize(str(source), scheme, progress=False, **kwargs), tmp_path / name)
    return tmp_path / name, source


def _logits(model, tokens=None):
    with torch.no_grad():
        return model(tiny_tokens() if tokens is None else tokens).logits


@pytest.mark.parametrize(
    "arch, scheme",
    [("llama", "int4-g32"), ("qwen2", "nf4-dq"), ("llama", "mixed")],
    ids=["llama-int4-tied", "qwen2-nf4dq-biases", "llama-mixed-lm-head-quantized"],
)
def test_from_pretrained_loads_a_lowbit_checkpoint_bit_exact(arch, scheme, tmp_path):
    if scheme == "mixed":
        scheme = tmp_path / "plan.yaml"
        scheme.write_text('rules:\n  "*.mlp.*": int8\n  "lm_head": mxfp4\n  "*": int3-g128\n')
    out, _ = _saved(tmp_path, arch, str(scheme))
    reference = lowbit.load(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    linears = quantized_linears(model)
    assert set(linears) == set(reference.lowbit_manifest["modules"])
    for name, module in linears.items():
        assert not hasattr(module, "weight")  # never a dense copy of a quantized weight
        expected = quantized_linears(reference)[name].qtensor.parts
        assert all(torch.equal(getattr(module, f"weight_{p}"), t) and getattr(module, f"weight_{p}").dtype == t.dtype for p, t in expected.items())
    assert model.dtype == torch.float32 and model.get_input_embeddings().weight.dtype == torch.float32  # upcast from 16 bits
    assert torch.equal(_logits(model), _logits(reference))
    assert model.get_memory_footprint() == reference.get_memory_footprint()  # the packed bytes
    assert model.lowbit_manifest == reference.lowbit_manifest


def test_quantizing_while_loading_equals_lowbit_quantize(tiny_model_dir):
    for scheme in ("nf4-dq", "int4-g128"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=lowbit.LowbitConfig(scheme=scheme))
        expected = lowbit.quantize(str(tiny_model_dir), scheme, progress=False)
        assert torch.equal(_logits(model), _logits(expected)), scheme
        assert model.get_memory_footprint() == expected.get_memory_footprint()
        assert {k: v for k, v in model.lowbit_manifest["modules"].items()} == expected.lowbit_manifest["modules"]
        assert model.lowbit_manifest["kept_dtype"] == "float16" and model.is_loaded_in_4bit
        assert all(not hasattr(m, "weight") for m in quantized_linears(model).values())


def test_compute_dtype_and_an_int8_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=lowbit.LowbitConfig(scheme="int8", compute_dtype=torch.bfloat16)
    )
    assert model.dtype == torch.bfloat16 and model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert quantized_linears(model)["model.layers.0.mlp.down_proj"].weight_scale.dtype == torch.float16  # parts as stored
    assert _logits(model).dtype == torch.bfloat16
    assert not getattr(model, "is_loaded_in_4bit", False)  # 8 bits
    assert model.lowbit_manifest["kept_dtype"] == "bfloat16"


def test_load_generate_save_load_again(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=lowbit.LowbitConfig(scheme="nf4-dq"))
    prompt = tiny_tokens(1, 6)
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lowbit" and config["quantization_config"]["modules"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(again.generate(prompt, max_new_tokens=5, do_sample=False), generated)
    assert torch.equal(_logits(again), _logits(model)) and torch.equal(_logits(lowbit.load(tmp_path / "saved")), _logits(model))
    for _ in range(2):  # the second time, the lowbit checkpoint there is replaced
        again.save_pretrained(tmp_path / "copy")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "copy")), _logits(model))
    with pytest.raises(lowbit.LowbitError, match="the model being read"):
        again.save_pretrained(tmp_path / "saved")  # never over the files it was loaded from
    with pytest.raises(lowbit.LowbitError, match="not written by lowbit"):
        again.save_pretrained(tiny_model_dir)  # anything else is refused, never overwritten


def test_calibrated_schemes_are_refused_at_load_time(tiny_model_dir):
    for scheme in ("int4-g128+clip", "int4-g128"):
        config = lowbit.LowbitConfig(scheme=scheme, method="gptq" if scheme == "int4-g128" else None)
        with pytest.raises(lowbit.LowbitError, match="calibration"):
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config)


def test_an_edited_checkpoint_is_refused_through_transformers(tmp_path):
    out, _ = _saved(tmp_path, "llama", "int4-g32")
    file = out / "model.safetensors"
    with open(file, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    tensors["model.layers.0.mlp.up_proj.weight_packed"][0, 0] ^= 1  # same shape and dtype, other bytes
    save_file(tensors, file, metadata=metadata)
    assert header_length > 0
    with pytest.raises(lowbit.LowbitError, match="does not match the checksum"):
        AutoModelForCausalLM.from_pretrained(out)
    tensors["model.layers.0.mlp.up_proj.weight_packed"] = tensors["model.layers.0.mlp.up_proj.weight_packed"][:-1]
    save_file(tensors, file, metadata=metadata)
    with pytest.raises(lowbit.LowbitError, match="should hold int4-g32 parts"):
        AutoModelForCausalLM.from_pretrained(out)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_a_plain_transformers_load_stops_with_what_to_do(tmp_path):
    """Without lowbit, transformers would skip the unknown quant_method and build random
    weights; the checkpoint's guard makes it stop and say to import lowbit."""
    out, _ = _saved(tmp_path, "llama", "int4-g32")
    result = _python(f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(out)!r})
        except Exception as error:
            assert "lowbit" not in sys.modules
            print(type(error).__name__, error)
            sys.exit(3)
        """)
    assert result.returncode == 3, result.stderr
    assert "import lowbit" in result.stdout and "lowbit.load" in result.stdout


def test_import_lowbit_is_cheap_and_registers_when_transformers_loads():
    result = _python("""
        import sys
        import lowbit
        assert "transformers.quantizers.auto" not in sys.modules and "transformers.modeling_utils" not in sys.modules
        from transformers import AutoModelForCausalLM, LlamaForCausalLM  # imports modeling_utils
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        print(AUTO_QUANTIZER_MAPPING["lowbit"].__name__, lowbit.LowbitConfig.__name__)
        """)
    assert result.returncode == 0, result.stderr
    assert "LowbitHfQuantizer LowbitConfig" in result.stdout


def test_dequantize_gives_dense_linears(tmp_path):
    out, _ = _saved(tmp_path, "llama", "int8")
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = _logits(model)
    model.dequantize()
    assert not quantized_linears(model) and not isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert torch.allclose(_logits(model), expected, atol=1e-5)
