"""The ``lowbit`` command, run in-process through ``lowbit.cli.main`` (and once as a real
subprocess): every command on a tiny saved model, and every user mistake answered with exit
status 2 and one ``error:`` line, no traceback, before anything slow or anything written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.eval import bits_per_weight, weight_bytes
from lowbit.nn import quantized_linears
from lowbit.formats import get_format
from lowbit.plan import PRESETS
from test_eval import EVALUATE_KEYS

REPO = Path(__file__).resolve().parents[1]
LLAMA_8B = REPO / "tests" / "data" / "configs" / "Meta-Llama-3-8B"


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``lowbit ARGS`` in-process; returns (exit status, stdout, stderr)."""
    # main() installs its own warnings.showwarning; put the original back after each test
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)

    def run(*args):
        capsys.readouterr()
        status = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def progress_line(line: str) -> bool:
    return "\r" in line or "it/s]" in line or "%|" in line


def assert_one_error(status: int, err: str, *words: str, quiet: bool = True) -> str:
    """Exit status 2, exactly one ``error:`` line, no traceback; ``quiet``: nothing else at all."""
    assert status == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    others = [line for line in lines if not line.startswith("error:")]
    if quiet:
        assert others == [], err
    else:
        assert all(progress_line(line) or line.startswith("warning:") for line in others), err
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir, tmp_path_factory):
    """``lowbit quantize`` of the tiny model, shared by the commands that read its output."""
    out = tmp_path_factory.mktemp("cli") / "tiny-int4"
    original = warnings.showwarning
    try:
        assert main(["quantize", str(tiny_model_dir), "-s", "int4-g32", "-o", str(out)]) == 0
    finally:
        warnings.showwarning = original
    return out


# -- the commands ------------------------------------------------------------------------------


def test_quantize(tiny_model_dir, tmp_path, cli):
    out = tmp_path / "q"
    status, stdout, err = cli("quantize", tiny_model_dir, "--scheme", "int4-g32", "--output", out)
    assert status == 0, err
    model, original = lowbit.load(out), lowbit.load(tiny_model_dir)
    modules = quantized_linears(model)
    assert len(modules) == 14 and {m.format_name for m in modules.values()} == {"int4-g32"}
    assert "quantized 14 linear layers with int4-g32 in" in stdout
    assert f"weights: {weight_bytes(original) / 1e6:.1f} MB -> {weight_bytes(model) / 1e6:.1f} MB" in stdout
    assert f"decoder linears: 32.000 -> {bits_per_weight(model):.3f} bits/weight" in stdout
    assert f"saved {out}" in stdout
    assert model.lowbit_manifest["source"] == str(tiny_model_dir)
    # the tokenizer travels with the checkpoint
    assert model.lowbit_tokenizer("abc")["input_ids"] == original.lowbit_tokenizer("abc")["input_ids"]


def test_quantize_with_calibration_and_plan_file(tiny_model_dir, eval_text_file, tmp_path, cli):
    plan = tmp_path / "plan.yaml"
    plan.write_text('rules:\n  "lm_head": keep\n  "*.mlp.*": int4-g32+clip\n  "*": int8\n')
    out = tmp_path / "q"
    status, _, err = cli(
        "quantize", tiny_model_dir, "-s", plan, "-o", out, "--calibration", eval_text_file,
        "--calibration-samples", 5, "--calibration-length", 32,
    )  # fmt: skip
    assert status == 0, err
    manifest = lowbit.load(out).lowbit_manifest
    assert manifest["calibration"] == {"samples": 5, "length": 32}
    assert manifest["plan"]["name"] == "plan.yaml"
    assert manifest["modules"]["model.layers.0.mlp.up_proj"] == {
        "format": "int4-g32", "spec": get_format("int4-g32").spec(), "algorithm": "rtn", "clip_search": True
    }  # fmt: skip
    assert manifest["modules"]["model.layers.0.self_attn.q_proj"] == {"format": "int8", "spec": get_format("int8").spec(), "algorithm": "rtn"}


def test_eval(quantized_dir, tiny_model_dir, eval_text_file, tmp_path, cli):
    report = tmp_path / "sub" / "eval.json"
    status, stdout, err = cli(
        "eval", quantized_dir, "--reference", tiny_model_dir, "--data", eval_text_file,
        "--windows", 2, "--window-length", 16, "--json", report,
    )  # fmt: skip
    assert status == 0, err
    result = json.loads(report.read_text())
    assert EVALUATE_KEYS <= set(result)
    assert result["windows"] == 2 and result["window_length"] == 16
    assert result["scheme"] == quantized_dir.name
    assert 1 < result["perplexity"] < 1000
    assert 0 < result["kl_divergence"] < 1 and 0 < result["top1_agreement"] <= 1
    assert result["weight_bytes"] == weight_bytes(lowbit.load(quantized_dir))
    assert 4.5 < result["bits_per_weight"] < 5
    # the same numbers as the API
    api = lowbit.evaluate(
        quantized_dir, reference=tiny_model_dir, data=eval_text_file, windows=2, window_length=16, progress=False
    )
    for key in ("perplexity", "kl_divergence", "top1_agreement", "weight_bytes", "bits_per_weight"):
        assert result[key] == api[key], key
    assert f"{result['perplexity']:.3f}" in stdout
    assert "2 windows of 16 tokens" in stdout and f"wrote {report}" in stdout
    assert not list(report.parent.glob("*.partial"))


def test_compare(tiny_model_dir, eval_text_file, tmp_path, cli):
    report = tmp_path / "compare.json"
    status, stdout, err = cli(
        "compare", tiny_model_dir, "--schemes", "int8, int4-g32", "--data", eval_text_file,
        "--window-length", 16, "--windows", 8, "--json", report,
    )  # fmt: skip
    assert status == 0, err
    result = json.loads(report.read_text())
    rows = result["rows"]
    assert [row["scheme"] for row in rows] == ["reference (float32)", "int8", "int4-g32"]
    reference, int8, int4 = rows
    assert reference["kl_divergence"] == 0 and reference["top1_agreement"] == 1
    assert reference["bits_per_weight"] == 32 and reference["quantization_seconds"] is None
    assert 0 < int8["kl_divergence"] < int4["kl_divergence"]
    assert int8["top1_agreement"] > int4["top1_agreement"]
    assert reference["weight_bytes"] > int8["weight_bytes"] > int4["weight_bytes"]
    assert 8 < int8["bits_per_weight"] < 8.5 and 4.5 < int4["bits_per_weight"] < 5
    assert all(row["quantization_seconds"] > 0 for row in (int8, int4))
    assert result["window_length"] == 16 and result["windows"] == 8
    assert "int4-g32" in stdout and "bits/weight" in stdout
    # quantizing for the comparison does not touch the saved model
    assert not quantized_linears(lowbit.load(tiny_model_dir))


def test_inspect_native_and_hf(quantized_dir, tiny_model_dir, tmp_path, cli):
    report = tmp_path / "native.json"
    status, stdout, err = cli("inspect", quantized_dir, "--tensors", "--json", report)
    assert status == 0, err
    native = json.loads(report.read_text())
    assert native["kind"] == "native" and native["plan"] == "int4-g32" and native["architecture"] == "LlamaForCausalLM"
    assert native["formats"]["int4-g32"]["tensors"] == 14
    file = quantized_dir / "model.safetensors"
    with open(file, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
    assert native["bytes"] == file.stat().st_size - 8 - header_length  # every byte of data, once
    assert "quantized by lowbit with int4-g32" in stdout
    assert "model.layers.0.self_attn.q_proj.weight" in stdout  # --tensors

    status, stdout, err = cli("inspect", tiny_model_dir, "--json", report)
    assert status == 0, err
    hf = json.loads(report.read_text())
    assert hf["kind"] == "hf" and hf["plan"] is None and set(hf["formats"]) == {"f32"}
    assert hf["bits_per_weight"] == 32
    assert hf["parameters"] == native["parameters"]  # same logical weights
    assert hf["bytes"] == weight_bytes(lowbit.load(tiny_model_dir))


def test_inspect_gguf(tmp_path, cli):
    import gguf
    import numpy as np

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = tmp_path / "gguf.json"
    status, stdout, err = cli("inspect", path, "--json", report)
    assert status == 0, err
    assert f"{path} (gguf): llama" in stdout
    result = json.loads(report.read_text())
    assert result["kind"] == "gguf" and result["architecture"] == "llama"
    assert result["formats"]["gguf:F32"] == {"tensors": 1, "weights": 128, "bytes": 512, "bits_per_weight": 32.0}
    assert result["formats"]["gguf:F16"] == {"tensors": 1, "weights": 64, "bytes": 128, "bits_per_weight": 16.0}
    assert {t["name"]: t["shape"] for t in result["tensors"]} == {"token_embd.weight": [16, 8], "blk.0.attn_q.weight": [8, 8]}


def test_size(tmp_path, cli):
    report = tmp_path / "size.json"
    status, stdout, err = cli("size", LLAMA_8B, "--json", report)
    assert status == 0, err
    result = json.loads(report.read_text())
    config = json.loads((LLAMA_8B / "config.json").read_text())
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * config["intermediate_size"] + 2 * hidden
    assert result["parameters"] == 2 * vocab * hidden + layers * per_layer + hidden == 8_030_261_248
    assert result["kv_cache_bytes"] == 2 * layers * kv * 4096 * 2  # K and V, bf16, 4096 tokens
    assert "8.03 billion parameters" in stdout


def test_generate(quantized_dir, cli):
    status, stdout, err = cli("generate", quantized_dir, "-p", "hello", "-n", 3)
    assert status == 0, err
    model = lowbit.load(quantized_dir)
    tokenizer = model.lowbit_tokenizer
    ids = torch.tensor([tokenizer("hello")["input_ids"]])
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = tokenizer.decode(ids[0, 5:], skip_special_tokens=True)
    assert stdout == expected + "\n"


def test_python_dash_m_help():
    result = subprocess.run(
        [sys.executable, "-m", "lowbit", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    for command in ("quantize", "eval", "compare", "size", "inspect", "generate"):
        assert command in result.stdout


# -- mistakes ------------------------------------------------------------------------------------


def test_missing_model_path(tmp_path, cli):
    status, _, err = cli("eval", tmp_path / "nope")
    assert_one_error(status, err, "no such model", "nope")


def test_directory_that_is_not_a_model(tmp_path, cli):
    (tmp_path / "notes.txt").write_text("x")
    status, _, err = cli("quantize", tmp_path, "-o", tmp_path / "out")
    assert_one_error(status, err, "not a model directory", "config.json")
    assert not (tmp_path / "out").exists()


def test_unknown_scheme(tiny_model_dir, tmp_path, cli):
    status, _, err = cli("quantize", tiny_model_dir, "-s", "int4-g12x", "-o", tmp_path / "out")
    line = assert_one_error(status, err, "unknown scheme 'int4-g12x'", quiet=False)
    for preset in PRESETS:
        assert preset in line
    assert list(tmp_path.iterdir()) == []


def test_unknown_scheme_in_compare_refused_before_loading(tiny_model_dir, cli, monkeypatch):
    from lowbit import api

    monkeypatch.setattr(api, "load_model", no_loading)
    status, _, err = cli("compare", tiny_model_dir, "--schemes", "int8,nf5")
    assert_one_error(status, err, "unknown scheme 'nf5'")


def test_unknown_scheme_refused_before_loading(tiny_model_dir, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(lowbit, "load", no_loading)
    status, _, err = cli("quantize", tiny_model_dir, "-s", "int4-g12x", "-o", tmp_path / "out")
    assert_one_error(status, err, "unknown scheme")


def test_output_exists_refused_before_loading(quantized_dir, tiny_model_dir, cli, monkeypatch):
    before = {p.name: p.read_bytes() for p in quantized_dir.iterdir()}
    monkeypatch.setattr(lowbit, "load", no_loading)
    status, stdout, err = cli("quantize", tiny_model_dir, "-s", "int8", "-o", quantized_dir)
    assert_one_error(status, err, "already exists", "--overwrite")
    assert stdout == ""
    assert {p.name: p.read_bytes() for p in quantized_dir.iterdir()} == before
    assert not [p for p in quantized_dir.parent.iterdir() if ".partial" in p.name]


def test_overwrite_replaces_output(tiny_model_dir, tmp_path, cli):
    out = tmp_path / "q"
    assert cli("quantize", tiny_model_dir, "-s", "int4-g32", "-o", out)[0] == 0
    status, _, err = cli("quantize", tiny_model_dir, "-s", "int8", "-o", out, "--overwrite")
    assert status == 0, err
    assert lowbit.load(out).lowbit_manifest["plan"]["name"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_eval_text_shorter_than_one_window(tiny_model_dir, tmp_path, cli):
    (tmp_path / "short.txt").write_text("twelve bytes")
    status, _, err = cli("eval", tiny_model_dir, "--data", tmp_path / "short.txt", "--window-length", 64)
    assert_one_error(status, err, "12 tokens, shorter than one window of 64", "--window-length", quiet=False)


def test_corrupt_safetensors(tiny_model_dir, tmp_path, cli, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    for command in (["quantize", broken, "-o", tmp_path / "out"], ["eval", broken], ["inspect", broken]):
        status, _, err = cli(*command)
        assert_one_error(status, err, "model.safetensors is not a valid safetensors file", "truncated")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("memory", ["24 bananas", "lots", "12"])
def test_bad_gpu_memory(cli, memory):
    status, _, err = cli("size", LLAMA_8B, "--gpu-memory", memory)
    assert_one_error(status, err, repr(memory))


def test_errors_from_the_real_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lowbit", "size", str(LLAMA_8B), "--gpu-memory", "24 bananas"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot read '24 bananas'") and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_main_leaves_warning_display_as_it_was(capsys):
    original = warnings.showwarning
    try:
        main(["size", str(LLAMA_8B)])
        assert warnings.showwarning is original
    finally:
        warnings.showwarning = original


# -- the first hour: an answer, every model spec, kept dtypes, the tokenizer kept ----------------


def test_compare_prints_an_answer(tiny_model_dir, eval_text_file, cli):
    status, stdout, err = cli(
        "compare", tiny_model_dir, "--schemes", "int4-g32,int8", "--data", eval_text_file,
        "--window-length", 16, "--windows", 4, "--max-kl", 0.5,
    )  # fmt: skip
    assert status == 0, err
    assert "[1/2] int4-g32" in err and "[2/2] int8" in err
    lines = stdout.splitlines()
    table = [line.split()[0] for line in lines if line.startswith(("reference (", "int8 ", "int4-g32 "))]
    assert table[:3] == ["reference", "int8", "int4-g32"]  # by size
    assert f"reference: {tiny_model_dir} (float32)" in stdout and "bos: false" in stdout and "(no BOS)" in stdout
    for word in ("bits/weight: bits per weight of the decoder's linear layers", "KL: ", "top-1: ", "±: one standard error across the 4 windows"):
        assert word in stdout, word
    assert "near-lossless (KL < 0.02):" in stdout and "good (KL < 0.1):" in stdout and "yours (KL < 0.5):" in stdout
    assert "next: " in stdout


def test_recipe_command(tiny_model_dir, eval_text_file, tmp_path, cli):
    report = tmp_path / "recipe.json"
    status, stdout, err = cli(
        "recipe", tiny_model_dir, "--max-kl", 100, "--data", eval_text_file, "--window-length", 16, "--windows", 4,
        "--json", report,
    )  # fmt: skip
    assert status == 0, err
    result = json.loads(report.read_text())
    assert result["answer"] == "int4-g128" and f"make it: {result['command']}" in stdout
    assert "[1/" in err and "int8" in err
    status, _, err = cli("recipe", tiny_model_dir, "--max-kl", -1)
    assert_one_error(status, err, "KL budget must be a positive number")


def test_size_takes_every_model_spec(tiny_model_dir, quantized_dir, tmp_path, cli, monkeypatch):
    expected = sum(p.numel() for p in lowbit.load(tiny_model_dir).parameters())
    for spec in (tiny_model_dir, tiny_model_dir / "config.json", quantized_dir):
        report = tmp_path / "size.json"
        status, _, err = cli("size", spec, "--json", report)
        assert status == 0, err
        assert json.loads(report.read_text())["parameters"] == expected, spec
    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda name, **k: config if name == "org/tiny" else pytest.fail(name))
    assert lowbit.size("org/tiny")["parameters"] == expected  # a hub id: its config, fetched by transformers
    status, _, err = cli("size", tmp_path / "nothing-here")
    assert_one_error(status, err, "no such model")


def test_size_of_the_default_model_and_its_gguf(cli):
    from lowbit.sources import default_model_path

    try:
        path = default_model_path()
    except lowbit.LowbitError as error:
        pytest.skip(str(error))
    for spec in ("smollm2-135m", path):
        status, stdout, err = cli("size", spec)
        assert status == 0, err
        assert "SmolLM2-135M-Instruct.Q4_1.gguf (LlamaForCausalLM): 0.13 billion parameters" in stdout
    assert lowbit.size("smollm2-135m")["parameters"] == 134_515_008  # 49152 x 576 tied + 30 layers + norm


def test_kept_tensors_are_stored_in_16_bits_and_computed_as_loaded(tiny_model_dir, tmp_path):
    """Kept tensors (embeddings, norms) are stored in 16 bits: float16 for a float32 source by
    default, bf16 when asked or declared, float32 with keep_dtype="fp32". The model keeps
    computing in float32 (their values are rounded to the stored dtype at once), the quantized
    parts are the same bytes either way, and the saved model loads back, upcast, exactly."""
    from safetensors import safe_open
    from tiny_models import tiny_model, tiny_tokens

    quantized, originals = {}, tiny_model("llama").get_input_embeddings().weight.detach().clone()
    for keep in ("bf16", None, "fp32"):
        model = tiny_model("llama")
        model.lowbit_source = "/models/tiny.gguf"
        quantized[keep] = lowbit.quantize(model, "int4-g32", keep_dtype=keep, progress=False)
    stored = {keep: m.lowbit_manifest["kept_dtype"] for keep, m in quantized.items()}
    assert stored == {"bf16": "bfloat16", None: "float16", "fp32": "float32"}
    for keep, model in quantized.items():
        embedding = model.get_input_embeddings().weight
        assert embedding.dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32  # computes as loaded
        assert model.lm_head.weight is embedding  # still tied
        as_stored = originals.to(getattr(torch, stored[keep])).float()
        assert torch.equal(embedding, as_stored), keep  # rounded to what the checkpoint holds
    assert not torch.equal(quantized["bf16"].get_input_embeddings().weight, originals)
    bf16, fp32 = quantized["bf16"], quantized["fp32"]
    for (name, a), (_, b) in zip(quantized_linears(bf16).items(), quantized_linears(fp32).items()):
        assert all(torch.equal(a.qtensor.parts[k], b.qtensor.parts[k]) for k in a.qtensor.parts), name
    embedding = bf16.get_input_embeddings().weight.numel()
    assert weight_bytes(fp32) - weight_bytes(bf16) == 2 * (embedding + 96 * 5)  # embedding and 5 norms of 96
    out = tmp_path / "bf16"
    lowbit.save(bf16, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) < weight_bytes(fp32)
    tokens = tiny_tokens()
    loaded = lowbit.load(out)
    assert loaded.get_input_embeddings().weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, bf16(tokens).logits)
    declared = tiny_model("llama")
    declared.config.dtype = torch.bfloat16  # as a bf16 checkpoint loaded in float32 declares
    assert lowbit.quantize(declared, "int4-g32", progress=False).lowbit_manifest["kept_dtype"] == "bfloat16"
    with pytest.raises(lowbit.LowbitError, match="keep dtype must be one of"):
        lowbit.quantize(tiny_model("llama"), "int8", keep_dtype="int8")


def test_in_place_example_saves_the_tokenizer_for_generate(tiny_model_dir, byte_tokenizer, tmp_path, cli):
    """README: quantize a transformers model in place, save it with its tokenizer, generate from it."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lowbit.quantize(m, "int8", progress=False)
    lowbit.save(m, tmp_path / "out", tokenizer=byte_tokenizer)
    status, stdout, err = cli("generate", tmp_path / "out", "-p", "hello", "-n", 3)
    assert status == 0, err and stdout
