"""The GGUF writer (``lowbit/export/gguf.py``, ``gguf_arch.py``): files llama.cpp's readers accept.

Each tiny random model of every family is written as F32, F16 and Q8_0 and read back by
gguf-py's own ``GGUFReader``, independently of lowbit's writer code: the metadata, the tensor
names (as gguf-py's table names them), shapes and types, and each tensor's bytes, which must
be what gguf-py's reference quantizer makes of the weights in llama.cpp's layout (Llama's q/k
rows permuted, Gemma's norms + 1). transformers' own GGUF loader then loads the file and must
reproduce the original model's logits: exactly for F32 (names, layouts and hyperparameters are
all right), within the rounding of the type for F16 and Q8_0. Bad input: an existing output,
an unsupported family, a low-bit GGUF source without ``allow_requantize``, an export that
fails half way (nothing is left behind). The per-tensor type rules are tested in
``test_gguf_mix.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize as gguf_quantize
from tiny_models import tiny_model, tiny_tokens

from lowbit.errors import LowbitError
from lowbit.export import gguf as gguf_export
from lowbit.export.gguf import GgufOptions, write_gguf
from lowbit.export.gguf_arch import GGUF_FAMILIES, permute_rows

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2")
#: transformers' GGUF loader reads no head_dim for Qwen3 (it assumes 128) and no
#: query_pre_attn_scalar for Gemma 2 (it assumes 256): give those the values it assumes
LOADER_SHAPES = {"qwen3": {"head_dim": 128}, "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256}}
VOCAB = 320  # 3 special tokens, 256 byte tokens, a few pieces and merges: see byte_fallback_tokenizer


def byte_fallback_tokenizer():
    """A sentencepiece-style BPE with byte fallback, built offline (lowbit's GGUF tokenizer
    converter writes it as a llama.cpp ``llama`` vocabulary, padded to the embedding's rows)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece in [*"\u2581abcdefghijklmnopqrstuvwxyz", "\u2581t", "he"]:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("\u2581", "t"), ("h", "e")], byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def saved_model(directory: Path, family: str, **overrides) -> torch.nn.Module:
    model = tiny_model(family, vocab_size=VOCAB, **overrides)
    model.save_pretrained(directory)
    byte_fallback_tokenizer().save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(family, type) -> (model, directory, file)``, each written once."""
    cache = {}

    def get(family: str, kind: str, loader_shapes: bool = False):
        key = (family, kind, loader_shapes)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{family}-{kind}")
            model = saved_model(directory, family, **(LOADER_SHAPES.get(family, {}) if loader_shapes else {}))
            path = directory / f"model-{kind}.gguf"
            summary = write_gguf(model, path, GgufOptions(kind), tokenizer_source=directory, name="tiny", progress=False)
            cache[key] = model, directory, path, summary
        return cache[key]

    return get


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def expected_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """GGUF name -> the float tensor in llama.cpp's layout, computed here from the HF model."""
    config = model.config.to_dict()
    family = config["model_type"]
    arch = gguf.MODEL_ARCH.LLAMA if family == "mistral" else next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    tied = config["tie_word_embeddings"] or family.startswith("gemma")
    expected = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        value = tensor.float()
        if family in ("llama", "mistral") and "q_proj" in name:
            value = permute_rows(value, config["num_attention_heads"])
        if family in ("llama", "mistral") and "k_proj" in name:
            value = permute_rows(value, config["num_key_value_heads"])
        if family.startswith("gemma") and name.endswith("norm.weight"):
            value = value + 1
        expected[names.get_name(name, try_suffixes=(".weight", ".bias"))] = value
    return expected


def stored_bytes(kind: str, value: torch.Tensor) -> np.ndarray:
    """What the file must hold: 1-D tensors are F32; the rest as gguf-py's reference makes them."""
    array = value.numpy().astype(np.float32)
    if value.dim() == 1 or kind == "F32":
        return array.view(np.uint8).reshape(-1)
    row = value.shape[-1]
    if kind == "Q8_0" and row % 32:
        kind = "F16"  # llama.cpp's fallback when no block divides the row
    return np.asarray(gguf_quantize(array, gguf.GGMLQuantizationType[kind])).view(np.uint8).reshape(-1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0"])
def test_file_holds_the_model_as_llama_cpp_lays_it_out(exported, family, kind):
    model, _, path, summary = exported(family, kind)
    reader = gguf.GGUFReader(path)
    arch = "llama" if family == "mistral" else family
    config = model.config
    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.ALL_F32 if kind == "F32" else gguf.LlamaFileType[f"MOSTLY_{kind}"])
    assert field(reader, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert field(reader, f"{arch}.block_count") == config.num_hidden_layers
    assert field(reader, f"{arch}.embedding_length") == config.hidden_size
    assert field(reader, f"{arch}.feed_forward_length") == config.intermediate_size
    assert field(reader, f"{arch}.attention.head_count") == config.num_attention_heads
    assert field(reader, f"{arch}.attention.head_count_kv") == config.num_key_value_heads
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert len(field(reader, "tokenizer.ggml.tokens")) == VOCAB

    expected = expected_tensors(model)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert set(tensors) == set(expected)
    assert summary["bytes"] == path.stat().st_size
    for name, value in expected.items():
        tensor = tensors[name]
        assert tuple(int(n) for n in reversed(tensor.shape)) == tuple(value.shape), name
        want = stored_bytes(kind, value)
        got = np.asarray(tensor.data).view(np.uint8).reshape(-1)
        assert got.tobytes() == want.tobytes(), f"{name} ({tensor.tensor_type.name})"


TOLERANCE = {"F32": 1e-5, "F16": 2e-3, "Q8_0": 3e-2}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"])
@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0"])
def test_transformers_gguf_loader_reproduces_the_logits(exported, family, kind):
    from transformers import AutoModelForCausalLM

    model, directory, path, _ = exported(family, kind, loader_shapes=True)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = tiny_tokens(2, 12)  # within Mistral's and Gemma 2's sliding windows of 16, which llama's graph has not
    with torch.no_grad():
        want, got = model(tokens).logits, loaded(tokens).logits
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= TOLERANCE[kind] * scale, family
    if kind == "F32":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    model = saved_model(tmp_path, "llama", rope_parameters=rope)
    write_gguf(model, tmp_path / "m.gguf", GgufOptions("F16"), tokenizer_source=tmp_path, progress=False)
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    inv_freq = model.model.rotary_emb.inv_freq  # transformers' own llama3 frequencies
    base = 1.0 / (500000.0 ** (torch.arange(0, 24, 2, dtype=torch.float32) / 24))
    np.testing.assert_allclose(factors, (base / inv_freq).numpy(), rtol=1e-5)


def test_a_lazily_loaded_model_streams_to_the_same_file(tmp_path, exported):
    from lowbit.sources import load_model

    _model, directory, path, _ = exported("qwen2", "Q8_0")
    lazy, _, _source = load_model(str(directory), lazy=True)
    assert any(p.is_meta for p in lazy.parameters())
    write_gguf(lazy, tmp_path / "lazy.gguf", GgufOptions("Q8_0"), tokenizer_source=directory, name="tiny", progress=False)
    assert (tmp_path / "lazy.gguf").read_bytes() == path.read_bytes()


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(LowbitError, match="already exists"):
        write_gguf(model, out, GgufOptions("F16"), progress=False)
    assert out.read_bytes() == b"keep me"
    write_gguf(model, out, GgufOptions("F16"), overwrite=True, progress=False)
    assert out.read_bytes()[:4] == b"GGUF"


def test_an_unsupported_family_is_refused_naming_the_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(LowbitError, match="gpt2.*it writes llama, mistral, qwen2"):
        write_gguf(model, tmp_path / "m.gguf", GgufOptions("F16"), progress=False)
    assert set(GGUF_FAMILIES) >= set(FAMILIES)


def test_a_gemma2_query_scale_llama_cpp_cannot_run_is_refused(tmp_path):
    model = tiny_model("gemma2", query_pre_attn_scalar=100)
    with pytest.raises(LowbitError, match="1/sqrt\\(100\\)"):
        write_gguf(model, tmp_path / "m.gguf", GgufOptions("F16"), progress=False)


def test_requantizing_a_low_bit_gguf_source_needs_allow_requantize(tmp_path, exported):
    model, _directory, source, _ = exported("llama", "Q8_0")
    with pytest.raises(LowbitError, match="already quantized .*Q8_0.*--allow-requantize"):
        write_gguf(model, tmp_path / "q4.gguf", GgufOptions("Q4_0"), source=source, progress=False)
    assert not (tmp_path / "q4.gguf").exists()
    write_gguf(model, tmp_path / "q8.gguf", GgufOptions("Q8_0"), source=source, progress=False)  # same type: no re-quantizing
    write_gguf(model, tmp_path / "q4.gguf", GgufOptions("Q4_0", allow_requantize=True), source=source, progress=False)


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    model = tiny_model("llama")
    calls = []

    def failing(kind, value, importance=None):
        calls.append(kind)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as Ctrl-C half way through the tensors
        return original(kind, value, importance)

    original = gguf_export.encode
    monkeypatch.setattr(gguf_export, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(model, tmp_path / "m.gguf", GgufOptions("Q8_0"), progress=False)
    assert os.listdir(tmp_path) == []


K_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.mark.parametrize("kind", ["Q4_K_M", "Q2_K", "IQ4_XS"])
def test_k_quant_mix_bytes_and_transformers_logits(tmp_path, kind):
    """A mix of K-quants: every tensor has the type llama-quantize picks and the bytes of lowbit's
    block formats (bit-exact with llama.cpp, tests/test_gguf_blocks*.py); transformers dequantizes
    the file with gguf-py and computes the logits of the model whose weights are our dequantized blocks."""
    from transformers import AutoModelForCausalLM

    from lowbit.export.gguf_mix import ModelFacts, TensorSite, choose_types
    from lowbit.formats.gguf_blocks import dequantize_ggml, quantize_ggml

    model = saved_model(tmp_path, "llama", **K_SHAPE)
    path = tmp_path / "k.gguf"
    write_gguf(model, path, GgufOptions(kind), tokenizer_source=tmp_path, name="tiny", progress=False)
    expected = expected_tensors(model)
    reader = gguf.GGUFReader(path)
    types = choose_types([TensorSite(t.name, tuple(expected[t.name].shape)) for t in reader.tensors], kind, ModelFacts(8, 4, 2)).types
    assert len({t for t in types.values()}) >= 3  # a real mix: base, promoted and F32 tensors
    dequantized = {}
    for tensor in reader.tensors:
        value = expected[tensor.name]
        assert tensor.tensor_type.name == types[tensor.name], tensor.name
        got = torch.from_numpy(np.asarray(tensor.data).view(np.uint8).reshape(-1).copy())
        if value.dim() == 1:
            assert got.numpy().view(np.float32).tolist() == value.tolist()
            continue
        want = quantize_ggml(types[tensor.name], value)
        assert torch.equal(got, want.reshape(-1)), tensor.name
        dequantized[tensor.name] = dequantize_ggml(types[tensor.name], want, tuple(value.shape))
    # the HF model with our dequantized weights, put back in transformers' layout
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 8)
    reference = tiny_model("llama", vocab_size=VOCAB, **K_SHAPE)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name in dequantized:
                value = dequantized[gguf_name]
                heads = 4 if "q_proj" in name else 2
                if "q_proj" in name or "k_proj" in name:  # undo the permutation (its inverse)
                    value = value.reshape(heads, value.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(value.shape)
                parameter.copy_(value)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = tiny_tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, reference(tokens).logits, rtol=1e-4, atol=1e-4)


def test_cli_writes_a_gguf_and_refuses_mixed_options(tmp_path, exported, capsys):
    from lowbit.cli import main

    _, directory, _, _ = exported("qwen2", "F16")
    out = tmp_path / "cli.gguf"
    assert main(["export", str(directory), "--to", "gguf", "--type", "q8_0", "--tensor-type", "ffn_down=F16", "-o", str(out)]) in (0, None)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert "saved" in capsys.readouterr().out
    assert main(["export", str(directory), "--to", "gguf", "--type", "Q4_K_Z", "-o", str(tmp_path / "x.gguf")]) == 2
    assert main(["export", str(directory), "--to", "native", "--pure", "-o", str(tmp_path / "x")]) == 2
    assert "--pure is an option of --to gguf" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x").exists()


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_cli_ollama_writes_the_gguf_and_a_modelfile(tmp_path, capsys):
    """``--to ollama``: a directory with model.gguf (the same file ``--to gguf`` writes) and a
    Modelfile whose TEMPLATE is the chat template; an existing output is refused unless --overwrite."""
    from lowbit.cli import main

    directory = tmp_path / "model"
    saved_model(directory, "llama")
    tokenizer = byte_fallback_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(directory)
    out = tmp_path / "ollama"
    assert main(["export", str(directory), "--to", "ollama", "--type", "Q8_0", "-o", str(out)]) in (0, None)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert "ollama create NAME -f" in capsys.readouterr().out
    lines = (out / "Modelfile").read_text().splitlines()
    assert "FROM ./model.gguf" in lines and any(line.startswith("TEMPLATE") for line in lines)
    assert "<|im_start|>" in (out / "Modelfile").read_text() and 'PARAMETER stop "<|im_end|>"' in lines
    single = tmp_path / "single.gguf"
    assert main(["export", str(directory), "--to", "gguf", "--type", "Q8_0", "-o", str(single)]) in (0, None)
    ours = {t.name: bytes(t.data) for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert ours == {t.name: bytes(t.data) for t in gguf.GGUFReader(single).tensors}
    assert main(["export", str(directory), "--to", "ollama", "-o", str(out)]) == 2  # exists
    assert main(["export", str(directory), "--to", "ollama", "--type", "Q8_0", "-o", str(out), "--overwrite"]) in (0, None)


def test_gptq_over_k_quant_blocks_beats_llama_cpp_rounding(tmp_path, eval_text_file):
    """``method="gptq"``: the pipeline runs GPTQ over each linear's ggml block format and the
    writer copies its blocks; same types as the mix, and on its calibration text the model
    llama.cpp's readers get is closer to the float model than with llama.cpp's own rounding."""
    import lowbit
    from transformers import AutoModelForCausalLM

    model = saved_model(tmp_path / "hf", "llama", **K_SHAPE)
    tokenizer = byte_fallback_tokenizer()
    tokens = tokenizer(eval_text_file.read_text(), return_tensors="pt")["input_ids"][:, :256].reshape(4, 64)
    files = {}
    for method in ("rtn", "gptq"):
        files[method] = tmp_path / f"{method}.gguf"
        lowbit.export_gguf(tmp_path / "hf", files[method], "Q3_K_M", method=method, calibration=tokens, progress=False)
    readers = {m: {t.name: t for t in gguf.GGUFReader(f).tensors} for m, f in files.items()}
    assert {n: t.tensor_type for n, t in readers["rtn"].items()} == {n: t.tensor_type for n, t in readers["gptq"].items()}
    assert bytes(readers["rtn"]["blk.0.attn_q.weight"].data) != bytes(readers["gptq"]["blk.0.attn_q.weight"].data)
    with torch.no_grad():
        want = model(tokens).logits
        errors = {}
        for method, path in files.items():
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
            errors[method] = (loaded(tokens).logits - want).pow(2).mean().item()
    assert errors["gptq"] < errors["rtn"], errors


def test_lowbit_export_to_gguf_takes_the_type_as_scheme(tmp_path, exported):
    import lowbit

    _, directory, _, _ = exported("qwen2", "F16")
    summary = lowbit.export(directory, tmp_path / "m.gguf", to="gguf", scheme="Q5_0", progress=False)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert summary["type"] == "Q5_0" and field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q5_0)
    with pytest.raises(LowbitError, match="imatrix file serves rtn only"):
        lowbit.export_gguf(directory, tmp_path / "g.gguf", "Q4_K_M", method="gptq", imatrix_file=tmp_path / "x")


def test_linears_lowbit_quantized_to_gguf_formats_are_copied(tmp_path):
    """A model quantized by lowbit's pipeline to ``gguf-*`` formats is written with its blocks as
    they are (the registered exporter); a format GGUF cannot hold is refused, naming why."""
    import lowbit
    from lowbit.export import export_model
    from lowbit.nn import quantized_linears

    model = lowbit.quantize(tiny_model("llama", **K_SHAPE), "gguf-q4_k", progress=False)
    export_model(model, tmp_path / "m.gguf", "gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    q = quantized_linears(model)["model.layers.1.mlp.down_proj"]
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "Q4_K"
    assert bytes(tensors["blk.1.ffn_down.weight"].data) == q.weight_blocks.numpy().tobytes()
    k = quantized_linears(model)["model.layers.0.self_attn.k_proj"].weight_blocks
    assert bytes(tensors["blk.0.attn_k.weight"].data) == permute_rows(k, 2).numpy().tobytes()  # llama's row order
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    with pytest.raises(LowbitError, match="gguf cannot carry int4-g128.*llama.cpp's block types"):
        export_model(lowbit.quantize(tiny_model("llama"), "int4-g128", progress=False), tmp_path / "x.gguf", "gguf")
