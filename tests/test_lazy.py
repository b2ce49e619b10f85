"""Lazy weights (``lowbit/lazy.py``) and the GGUF cache (``lowbit/gguf_cache.py``).

A lazily loaded model must end up bit-identical to transformers' own ``from_pretrained``
(every architecture, float32 and bfloat16, sharded or not, tied or not); it must read only
what is asked for, never initialise a weight at random, and refuse files that do not hold
exactly the tensors its config implies before reading any. The GGUF cache is checked with
a stand-in loader here (its bytes against the real GGUF are checked in test_real_model.py).
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokens
from torch import nn
from transformers import AutoModelForCausalLM

from lowbit import gguf_cache, lazy
from lowbit.errors import LowbitError
from lowbit.lazy import NeedsEagerLoading, StoredTensors, lazy_model
from lowbit.sources import load_model


def saved(tmp_path: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, **kwargs) -> Path:
    directory = tmp_path / f"{arch}-{str(dtype)[6:]}"
    tiny_model(arch).to(dtype).save_pretrained(directory, **kwargs)
    return directory


def assert_same_model(model: nn.Module, expected: nn.Module) -> None:
    """Same tensors (names, dtypes, bits), same ties, same logits, same generation config."""
    ours, theirs = model.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    tied = expected.lm_head.weight is expected.get_input_embeddings().weight
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    assert model.generation_config.to_dict() == expected.generation_config.to_dict()
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(tiny_tokens()).logits, expected(tiny_tokens()).logits)


def meta_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.is_meta}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lazy_load_equals_from_pretrained(arch, dtype, tmp_path):
    directory = saved(tmp_path, arch, dtype)
    expected = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")

    model, _, _ = load_model(directory, lazy=True)
    weights = model.lowbit_weights
    everything = {name for name, _ in model.named_parameters()}
    assert meta_names(model) == everything and set(weights.pending()) == everything  # nothing read yet

    weights.materialize_outside("model.layers")
    assert meta_names(model) == {n for n in everything if n.startswith("model.layers.")}
    weights.materialize("model.layers.1.")
    assert meta_names(model) == {n for n in everything if n.startswith("model.layers.0.")}
    weights.materialize_all()
    assert weights.pending() == [] and meta_names(model) == set()
    assert_same_model(model, expected)

    eager, _, _ = load_model(directory)  # lazy=False: everything read, nothing left to load
    assert not hasattr(eager, "lowbit_weights")
    assert_same_model(eager, expected)


def test_requested_dtype_and_sharded_checkpoint(tmp_path):
    directory = saved(tmp_path, "qwen2", max_shard_size="20KB")
    assert len(list(directory.glob("*.safetensors"))) > 2 and (directory / lazy.INDEX_FILE).is_file()
    for dtype in (torch.bfloat16, torch.float16):
        model, _, _ = load_model(directory, dtype=dtype)
        assert_same_model(model, AutoModelForCausalLM.from_pretrained(directory, dtype=dtype))


def test_untied_lm_head_is_read_from_the_file(tmp_path):
    directory = tmp_path / "untied"
    tiny_model("llama", tie_word_embeddings=False).save_pretrained(directory)
    model, _, _ = load_model(directory, lazy=True)
    model.lowbit_weights.materialize("lm_head.")
    assert not model.lm_head.weight.is_meta and model.get_input_embeddings().weight.is_meta
    model.lowbit_weights.materialize_all()
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(directory))


def test_tied_lm_head_comes_with_the_embedding(tmp_path):
    directory = saved(tmp_path)  # tiny llama ties its embeddings
    assert "lm_head.weight" not in StoredTensors(directory).entries
    model, _, _ = load_model(directory, lazy=True)
    model.lowbit_weights.materialize("lm_head.")
    assert model.lm_head.weight is model.get_input_embeddings().weight and not model.lm_head.weight.is_meta


def test_replaced_modules_are_skipped_and_freed(tmp_path):
    """What the pipeline does: read one layer, replace its linears, go on. The float weights of
    a replaced linear are held by nothing (LazyWeights keeps names, not tensors)."""
    model, _, _ = load_model(saved(tmp_path), lazy=True)
    weights = model.lowbit_weights
    weights.materialize("model.layers.0.")
    old = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    model.model.layers[0].self_attn.q_proj = nn.Linear(96, 96, bias=False)
    gc.collect()
    assert old() is None
    weights.materialize("model.layers.0.")  # nothing left there; the replaced linear is not read
    assert all(not name.startswith("model.layers.0.") for name in weights.pending())


def rewrite(directory: Path, change) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda t: t.pop("model.layers.1.mlp.down_proj.weight"), r"missing: model\.layers\.1\.mlp\.down_proj\.weight"),
        (lambda t: t.__setitem__("model.layers.0.extra", torch.zeros(2)), r"not in the model: model\.layers\.0\.extra"),
        (
            lambda t: t.__setitem__("model.norm.weight", torch.zeros(95)),
            r"wrong shape: model\.norm\.weight \[95\] \(needs \[96\]\)",
        ),
        (
            lambda t: t.__setitem__("model.norm.weight", torch.zeros(96, dtype=torch.int32)),
            r"not a float type: model\.norm\.weight \(I32\)",
        ),
    ],
    ids=["missing", "extra", "shape", "dtype"],
)
def test_files_that_do_not_match_the_config_are_refused_before_reading(tmp_path, change, words, monkeypatch):
    directory = saved(tmp_path)
    rewrite(directory, change)
    monkeypatch.setattr(StoredTensors, "read", lambda *a: pytest.fail("read tensors before checking them"))
    for is_lazy in (True, False):
        with pytest.raises(LowbitError, match=rf"does not hold the weights its config.json describes \(.*{words}"):
            load_model(directory, lazy=is_lazy)


def test_bin_checkpoint_loads_eagerly(tmp_path):
    directory = tmp_path / "bin"
    model = tiny_model("llama")
    model.config.save_pretrained(directory)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="completely, not lazily: .* has no safetensors weights"):
        model, _, _ = load_model(directory, lazy=True)
    assert not hasattr(model, "lowbit_weights")
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(directory))


def test_renamed_checkpoint_keys_load_eagerly(tmp_path, monkeypatch):
    """A family whose keys transformers renames on load is read by transformers, with a reason."""
    import transformers.conversion_mapping as mapping

    directory = saved(tmp_path)
    monkeypatch.setattr(mapping, "extract_weight_conversions_for_model", lambda model: ["a renaming"])
    with pytest.raises(NeedsEagerLoading, match="renames llama checkpoint keys"):
        lazy_model(directory)
    with pytest.warns(UserWarning, match="renames llama checkpoint keys"):
        model, _, _ = load_model(directory, lazy=True)
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(directory))


# -- the GGUF cache ----------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(root))
    return root


@pytest.fixture
def fake_gguf(tmp_path) -> Path:
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF stand-in")
    return path


def test_cache_is_written_once_and_reused(cache, fake_gguf, byte_tokenizer):
    calls = []

    def load():
        calls.append(1)
        return tiny_model("llama"), byte_tokenizer

    directory = gguf_cache.dequantized_directory(fake_gguf, load)
    assert directory.parent == cache / "gguf" and directory.name.startswith("tiny-")
    assert gguf_cache.dequantized_directory(fake_gguf, load) == directory and len(calls) == 1
    record = json.loads((directory / gguf_cache.RECORD_FILE).read_text())
    assert record["gguf"] == str(fake_gguf.resolve()) and record["size"] == len(b"GGUF stand-in")
    assert record["mtime_ns"] == fake_gguf.stat().st_mtime_ns
    assert sorted(p.name for p in cache.joinpath("gguf").iterdir()) == [directory.name]  # no temporary left
    # a plain transformers directory with the same weights, and the tokenizer
    model, tokenizer, _ = load_model(directory)
    assert_same_model(model, tiny_model("llama"))
    assert tokenizer("lowbit")["input_ids"] == byte_tokenizer("lowbit")["input_ids"]


def test_cache_follows_the_file(cache, fake_gguf, byte_tokenizer):
    calls = []

    def load():
        calls.append(1)
        return tiny_model("llama"), byte_tokenizer

    first = gguf_cache.dequantized_directory(fake_gguf, load)
    fake_gguf.write_bytes(b"GGUF stand-in, edited")  # another size and time: another entry
    second = gguf_cache.dequantized_directory(fake_gguf, load)
    assert second != first and len(calls) == 2
    (second / gguf_cache.RECORD_FILE).write_text("{}")  # a record that does not match: rebuilt
    assert gguf_cache.dequantized_directory(fake_gguf, load) == second and len(calls) == 3
    assert json.loads((second / gguf_cache.RECORD_FILE).read_text())["size"] == fake_gguf.stat().st_size


def test_cache_write_failure_leaves_nothing(cache, fake_gguf, byte_tokenizer, monkeypatch):
    model = tiny_model("llama")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", disk_full)
    with pytest.warns(UserWarning, match="could not cache the dequantized GGUF.*No space left"):
        assert gguf_cache.dequantized_directory(fake_gguf, lambda: (model, byte_tokenizer)) is None
    assert list(cache.joinpath("gguf").iterdir()) == []


def test_cache_root_defaults_to_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("LOWBIT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gguf_cache.cache_root() == tmp_path / ".cache" / "lowbit"
