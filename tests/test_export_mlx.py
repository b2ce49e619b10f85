"""The MLX export (``lowbit/export/mlx.py``), proven by MLX itself.

- Layout: every width and group size MLX runs, symmetric and asymmetric, on awkward shapes:
  ``mx.dequantize`` of what lowbit writes equals lowbit's dequantized weight bit for bit in a
  float32 model; in float16 / bfloat16 it stays within the documented bound. MXFP4 maps exactly.
- Consumer: ``mlx_lm.load(OUT)`` on tiny random Llama (tied embeddings) and Qwen2 (q/k/v
  biases) models at int4-g64, int8-g32 and a mixed plan (per-layer bits, groups, MXFP4, a float
  layer, a kept layer, a quantized lm_head, several shards): logits match lowbit's model and
  ``mlx_lm.stream_generate``'s greedy tokens are lowbit's ``generate`` tokens.
- Bad input: formats MLX cannot carry, partial groups, an existing output, an interrupted export.
- Heavy: SmolLM2-135M at int4-g64 through ``mlx_lm.load`` / generate.

mlx runs on Linux CPUs (``pip install "mlx-lm[cpu]"``, in the ``test`` extra); without it the
consumer tests skip, saying why.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_byte_tokenizer
from tiny_models import tiny_model

import lowbit
from lowbit.errors import LowbitError
from lowbit.export import mlx as mlx_export
from lowbit.formats import get_format
from lowbit.lazy import INDEX_FILE
from lowbit.plan import Plan, make_rule

mx = pytest.importorskip("mlx.core", reason="mlx is not installed: pip install 'mlx-lm[cpu]' (the test extra)")
mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is not installed: pip install 'mlx-lm[cpu]' (the test extra)")
mlx_nn = pytest.importorskip("mlx.nn")

#: hidden and intermediate sizes every MLX group size divides but 128 (the down projection's 320)
SHAPES = {"hidden_size": 128, "intermediate_size": 320, "head_dim": 32}
PROMPT = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(3)).tolist()
NEW_TOKENS = 12
MX_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def to_numpy(array) -> np.ndarray:
    return np.array(array.astype(mx.float32))


def mlx_weight(fmt, weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, np.ndarray]:
    """(MLX's dequantization of what the exporter writes for ``weight``, lowbit's own) in ``dtype``."""
    module = lowbit.nn.QuantLinear.from_qtensor(fmt.quantize(weight))
    tensors = mlx_export.module_tensors("x", module, dtype)
    as_mx = {key: mx.array(t.view(torch.int16).numpy()).view(getattr(mx, MX_DTYPES[dtype])) if t.dtype == torch.bfloat16
             else mx.array(t.numpy()) for key, t in tensors.items()}  # fmt: skip
    entry = mlx_export.quantization_entry(fmt)
    mine = mx.dequantize(
        as_mx["x.weight"], as_mx["x.scales"], as_mx.get("x.biases"), group_size=entry["group_size"], bits=entry["bits"],
        mode=entry["mode"], dtype=getattr(mx, MX_DTYPES[dtype]),
    )  # fmt: skip
    return to_numpy(mine), module.dequantize_weight(dtype).float().numpy()


@pytest.mark.parametrize("bits", mlx_export.MLX_BITS)
@pytest.mark.parametrize("group", mlx_export.MLX_GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_mlx_dequantizes_lowbit_weights_exactly_in_float32(bits, group, symmetric):
    fmt = get_format(f"int{bits}-{'sym' if symmetric else 'asym'}-g{group}")
    generator = torch.Generator().manual_seed(bits * 1000 + group)
    weight = torch.randn(7, 3 * group, generator=generator) * 0.05  # odd rows, three groups
    weight[:, :group] += 0.3  # a group far from zero: large zero points
    weight[3, group : 2 * group] = 0  # an all-zero group: scale 0
    mine, reference = mlx_weight(fmt, weight)
    np.testing.assert_array_equal(mine, reference)


def test_mxfp4_maps_exactly():
    weight = torch.randn(5, 96, generator=torch.Generator().manual_seed(0)) * 0.1
    weight[1, :32] = 0
    for dtype in MX_DTYPES:
        mine, reference = mlx_weight(get_format("mxfp4"), weight, dtype)
        np.testing.assert_array_equal(mine, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["int4-g64", "int8-g32", "int4-sym-g128", "int3-g32"])
def test_16_bit_models_stay_within_the_documented_bound(dtype, name):
    """Computed in 16 bits, scale * q + bias differs from lowbit's weight by a few units in the
    last place of the group's range: at most 4 * 2**bits * eps(dtype) quantization steps."""
    fmt = get_format(name)
    weight = torch.randn(9, 256, generator=torch.Generator().manual_seed(1)) * 0.05 + 0.02
    mine, reference = mlx_weight(fmt, weight, dtype)
    scale = fmt.unpack(fmt.quantize(weight).parts, tuple(weight.shape))[1].scale
    steps = np.abs(mine - reference) / np.repeat(scale.numpy(), fmt.group_size, axis=1).clip(min=1e-30)
    bound = 4 * 2**fmt.bits * torch.finfo(dtype).eps
    assert steps.max() <= bound
    assert steps.max() > 0  # not exact: that is why the export warns


# -- whole models through mlx_lm --------------------------------------------------------------


def export_and_load(model, tmp_path: Path, **kwargs):
    out = tmp_path / "mlx"
    mlx_export.save_mlx(model, out, make_byte_tokenizer(), **kwargs)
    loaded, tokenizer = mlx_lm.load(str(out))
    return out, loaded, tokenizer


def check_same_model(model, loaded, tokenizer, atol: float = 1e-4) -> None:
    """Logits within ``atol``, the same argmax at every position, the same greedy tokens."""
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0].float().numpy()
    got = to_numpy(loaded(mx.array([PROMPT]))[0])
    np.testing.assert_allclose(got, expected, atol=atol, rtol=0)
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    with torch.no_grad():
        prompt = torch.tensor([PROMPT])  # the mask says so: Phi-3's pad id 0 is in the prompt, and generate would mask it
        ours = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False)
        ours = ours[0, len(PROMPT) :].tolist()
    theirs = [response.token for response in mlx_lm.stream_generate(loaded, tokenizer, PROMPT, max_tokens=NEW_TOKENS)]
    assert theirs == ours
    assert len(set(ours)) > 1, "a degenerate continuation proves little; pick another prompt"


@pytest.mark.parametrize(
    ("arch", "scheme"),
    [("llama", "int4-g64"), ("qwen2", "int8-g32"), ("qwen2", "int4-g64"), ("mistral", "int4-g64"), ("phi3", "int8-g32")],
)
def test_mlx_lm_runs_the_export_like_lowbit(tmp_path, arch, scheme):
    window = {"sliding_window": len(PROMPT) + NEW_TOKENS} if arch == "mistral" else {}  # see test_sliding_windows_warn
    model = lowbit.quantize(tiny_model(arch, **SHAPES, **window), scheme, progress=False)
    with pytest.warns(UserWarning, match="sliding window") if window else contextlib.nullcontext():
        out, loaded, tokenizer = export_and_load(model, tmp_path)
    config = json.loads((out / "config.json").read_text())
    fmt = get_format(scheme)
    assert config["quantization"] == {
        "group_size": fmt.group_size, "bits": fmt.bits, "mode": "affine", "lm_head": False, "model.embed_tokens": False,
    }  # fmt: skip
    assert config["quantization_config"] == config["quantization"]
    assert config["lowbit_export"]["target"] == "mlx"
    assert isinstance(loaded.model.layers[0].mlp.down_proj, mlx_nn.QuantizedLinear)
    check_same_model(model, loaded, tokenizer)


MIXED_PLAN = Plan(
    [
        make_rule("lm_head", "int8-g32"),  # tied in the source: the export must untie it
        make_rule("model.layers.0.self_attn.v_proj", "keep"),
        make_rule("model.layers.0.self_attn.k_proj", "fp16"),
        make_rule("*.self_attn.*", "int4-g64"),
        make_rule("model.layers.1.mlp.*", "mxfp4"),
        make_rule("*.mlp.down_proj", "int8-sym-g32"),
        make_rule("*.mlp.gate_proj", "int3-g128"),
        make_rule("*", "int6-g64"),
    ],
    name="mixed",
)


def test_a_mixed_plan_in_several_shards(tmp_path):
    model = lowbit.quantize(tiny_model("llama", **SHAPES), MIXED_PLAN, progress=False)
    out, loaded, tokenizer = export_and_load(model, tmp_path, max_shard_bytes=40_000)
    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization"]
    assert {k: quantization[k] for k in ("group_size", "bits", "mode")} == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert quantization["lm_head"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert quantization["model.layers.1.mlp.up_proj"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert quantization["model.layers.0.mlp.gate_proj"] == {"group_size": 128, "bits": 3, "mode": "affine"}
    assert quantization["model.layers.0.mlp.up_proj"] == {"group_size": 64, "bits": 6, "mode": "affine"}
    assert quantization["model.layers.0.self_attn.v_proj"] is False
    assert quantization["model.layers.0.self_attn.k_proj"] is False
    assert "model.layers.0.self_attn.q_proj" not in quantization  # the default
    assert config["tie_word_embeddings"] is False
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    layer = loaded.model.layers[0]
    assert (layer.mlp.gate_proj.bits, layer.mlp.gate_proj.group_size) == (3, 128)
    assert loaded.model.layers[1].mlp.up_proj.mode == "mxfp4"
    assert not hasattr(layer.self_attn.v_proj, "scales")
    check_same_model(model, loaded, tokenizer)


def test_a_bfloat16_model_warns_and_stays_close(tmp_path):
    model = lowbit.quantize(tiny_model("qwen2", **SHAPES).to(torch.bfloat16), "int4-g64", progress=False)
    with pytest.warns(UserWarning, match="quantized in float32"):
        out, loaded, _ = export_and_load(model, tmp_path)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        exact = model.float()(torch.tensor([PROMPT])).logits[0].numpy()  # the same weights, computed in float32
    got = to_numpy(loaded(mx.array([PROMPT]))[0])
    # measured: MLX 0.074 from float32, lowbit's own bfloat16 run 0.016 (a dense bf16 layer in MLX: 0.015):
    # weights rounded by 16-bit scale * q + bias, and MLX's bfloat16 quantized matmul
    assert np.abs(got - exact).max() < 0.2 * exact.std()


def test_sliding_windows_mlx_lm_ignores_are_warned_about(tmp_path):
    """mlx-lm runs Mistral as Llama, every layer global: past the window it is another model."""
    model = lowbit.quantize(tiny_model("mistral", **SHAPES), "int4-g64", progress=False)  # a window of 16
    with pytest.warns(UserWarning, match="without its sliding window of 16 tokens"):
        _, loaded, _ = export_and_load(model, tmp_path)
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0].numpy()
    got = to_numpy(loaded(mx.array([PROMPT]))[0])
    np.testing.assert_allclose(got[:16], expected[:16], atol=1e-4, rtol=0)
    assert np.abs(got[16:] - expected[16:]).max() > 0.01  # if mlx-lm learns sliding windows, drop the warning


def test_the_writer_needs_no_mlx(tmp_path, monkeypatch):
    for name in ("mlx", "mlx.core", "mlx.nn", "mlx_lm"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of them now fails
    importlib.reload(mlx_export)  # its imports run again
    model = lowbit.quantize(tiny_model("llama", **SHAPES), "int4-g64", progress=False)
    mlx_export.save_mlx(model, tmp_path / "out", make_byte_tokenizer())
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_transformers_5_rope_parameters_reach_mlx_lm():
    """mlx-lm reads ``rope_theta``; transformers 5 writes ``rope_parameters`` (Qwen2 would fall back to 1e6)."""
    config = {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    assert mlx_export.legacy_rope(config) == {"rope_theta": 10000.0}
    scaled = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}
    assert mlx_export.legacy_rope(scaled) == {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "type": "llama3"}}
    assert mlx_export.legacy_rope({"rope_theta": 1.0, "rope_parameters": {"rope_theta": 2.0}}) == {}


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        ("nf4", "not nf4"),
        ("fp8", "not fp8"),
        ("int7-g64", "not 7-bit"),
        ("int8", "not whole rows"),
        ("int4-g256", "not 256"),
        ("int4-g16", "not 16"),
    ],
)
def test_formats_mlx_cannot_carry_are_refused(tmp_path, scheme, message):
    model = lowbit.quantize(tiny_model("llama", **SHAPES), scheme, progress=False)
    with pytest.raises(LowbitError, match=f"mlx cannot carry .*{message}.*native"):
        lowbit.export(model, tmp_path / "out", to="mlx")
    assert list(tmp_path.iterdir()) == []


def test_partial_groups_are_refused_before_writing(tmp_path):
    model = lowbit.quantize(tiny_model("llama", **SHAPES), "int4-g128", progress=False)  # down_proj: 320 columns
    with pytest.raises(LowbitError, match=r"down_proj has 320 input features.*group of 128.*\(g32, g64\)"):
        lowbit.export(model, tmp_path / "out", to="mlx")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused(tmp_path):
    model = lowbit.quantize(tiny_model("llama", **SHAPES), "int4-g64", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(LowbitError, match="already exists|not written by lowbit"):
            lowbit.export(model, out, to="mlx", overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_overwrite_replaces_an_mlx_export(tmp_path):
    out = tmp_path / "out"
    first = lowbit.quantize(tiny_model("llama", **SHAPES), "int8-g32", progress=False)
    mlx_export.save_mlx(first, out, make_byte_tokenizer())
    second = lowbit.quantize(tiny_model("llama", **SHAPES), "int4-g64", progress=False)
    with pytest.raises(LowbitError, match="already exists"):
        mlx_export.save_mlx(second, out, make_byte_tokenizer())
    mlx_export.save_mlx(second, out, make_byte_tokenizer(), overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_export_leaves_nothing(tmp_path, monkeypatch, error):
    model = lowbit.quantize(tiny_model("llama", **SHAPES), "int4-g64", progress=False)
    calls = []
    real_save = mlx_export.save_file

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second shard
            raise error
        return real_save(*args, **kwargs)

    monkeypatch.setattr(mlx_export, "save_file", failing_save)
    with pytest.raises(type(error)):
        mlx_export.save_mlx(model, tmp_path / "out", make_byte_tokenizer(), max_shard_bytes=40_000)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_cli_exports_to_mlx(tmp_path, capsys):
    from lowbit.cli import main

    source = tmp_path / "tiny"
    tiny_model("qwen2", **SHAPES).save_pretrained(source)
    make_byte_tokenizer().save_pretrained(source)
    command = ["export", str(source), "--to", "mlx", "--scheme"]
    assert main([*command, "int4-g64", "-o", str(tmp_path / "out")]) == 0
    _, tokenizer = mlx_lm.load(str(tmp_path / "out"))
    assert tokenizer.decode(tokenizer.encode("a river")) == "a river"
    capsys.readouterr()
    assert main([*command, "int4-g128", "-o", str(tmp_path / "other")]) == 2
    errors = capsys.readouterr().err
    assert errors.strip().splitlines()[-1].startswith("error: MLX needs whole groups: model.layers.0.mlp.down_proj")
    assert "Traceback" not in errors and not (tmp_path / "other").exists()


# -- the real model ---------------------------------------------------------------------------


@pytest.mark.heavy
def test_smollm2_through_mlx_lm(tmp_path):
    model = lowbit.quantize("smollm2-135m", "int4-g64", progress=False)
    summary = lowbit.export(model, tmp_path / "mlx", to="mlx")  # the tokenizer: model.lowbit_tokenizer
    loaded, mlx_tokenizer = mlx_lm.load(summary["path"])
    prompt = mlx_tokenizer.encode("The capital of France is")
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0].float().numpy()
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt) :].tolist()
    got = to_numpy(loaded(mx.array([prompt]))[0])
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    theirs = [r.token for r in mlx_lm.stream_generate(loaded, mlx_tokenizer, prompt, max_tokens=16)]
    assert theirs == ours[: len(theirs)] and len(theirs) >= 8
