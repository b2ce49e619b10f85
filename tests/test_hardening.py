"""Bad inputs and faults (issue 11): every one is refused by the command line with exit status 2,
exactly one ``error:`` line, no traceback, and nothing left behind (nor anything of the user's
removed). Files are crafted here from the tiny models; signals, a closed pipe and the memory
bound run the command in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from crafted_files import write_tiny_gguf
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export import atomic

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# -- helpers -----------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``roots``: what a refused command must leave as it was."""
    seen = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            stat = path.lstat()
            seen[str(path)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns if path.is_file() else 0)
    return seen


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(argv, capsys, *roots: Path, match: str | None = None) -> str:
    """The command exits 2 with one ``error:`` line, no traceback, and changes nothing under ``roots``."""
    before = snapshot(*roots)
    code, _, err = run(argv, capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert snapshot(*roots) == before, f"files changed: {err}"
    if match is not None:
        assert match in errors[0], errors[0]
    return errors[0]


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_str(key: str, value: str) -> bytes:
    return gstr(key) + struct.pack("<I", 8) + gstr(value)


def tensor_info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset)


def raw_gguf(kvs: list[bytes], tensors: list[bytes], data: bytes = b"", *, n_kv=None, n_tensors=None, version=3, magic=b"GGUF") -> bytes:
    """A GGUF file byte by byte (the counts may lie)."""
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data


ARCH = kv_str("general.architecture", "llama")


def write_st(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def f32(shape, start):
    count = 1
    for dim in shape:
        count *= dim
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, start + 4 * count]}


# -- shared fixtures ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch) -> Path:
    directory = tmp_path_factory.getbasetemp() / "hardening-cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(directory))
    return directory


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory, byte_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("native") / "q"
    model = lowbit.quantize(tiny_model("llama"), "int4-g128", progress=False)
    lowbit.save(model, out, tokenizer=byte_tokenizer)
    return out


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def copy_dir(source: Path, work: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(source, work / name))


def edit_config(directory: Path, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def edit_header(file: Path, change) -> None:
    """Rewrite a safetensors header in place (same data section)."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (length - len(new)) if len(new) <= length else b""
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length :])


# -- GGUF sources ------------------------------------------------------------------------------


def test_gguf_with_only_an_architecture_is_refused_without_allocating(work, capsys, cache):
    (work / "a.gguf").write_bytes(raw_gguf([ARCH], []))
    assert_refused(["quantize", "a.gguf", "-o", "out"], capsys, work, cache, match="describes no model")
    assert_refused(["inspect", "a.gguf"], capsys, work, match="holds no weights")


@pytest.mark.parametrize(
    "drop, metadata, match",
    [
        (("blk.1.ffn_down.weight",), None, "missing: blk.1.ffn_down.weight"),
        (("token_embd.weight",), None, "missing: token_embd.weight"),
        ((), {"attention.head_count": 0}, "num_attention_heads must be a positive integer"),
        ((), {"attention.head_count": 5, "attention.key_length": None, "attention.value_length": None, "rope.dimension_count": None}, "not a multiple of num_attention_heads"),
        ((), {"embedding_length": 200}, "wrong shape: token_embd.weight [256, 96] (needs [256, 200])"),
        ((), {"feed_forward_length": 96}, "wrong shape: blk.0.ffn_gate.weight [200, 96] (needs [96, 96])"),
        ((), {"block_count": 3}, "missing: blk.2."),
    ],
    ids=["missing-layer-tensor", "missing-embedding", "zero-heads", "heads-do-not-divide", "swapped-dims", "wrong-ffn", "more-layers"],
)
def test_gguf_that_does_not_hold_its_model(work, capsys, cache, drop, metadata, match):
    write_tiny_gguf(work / "m.gguf", drop=drop, metadata=metadata)
    assert_refused(["quantize", "m.gguf", "-o", "out", "--scheme", "int8"], capsys, work, cache, match=match)


def test_gguf_with_an_extra_tensor(work, capsys, cache):
    import gguf

    path = work / "extra.gguf"
    write_tiny_gguf(path)
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(work / "x.gguf"), "llama")
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            writer.add_uint32(field.name, int(field.parts[field.data[0]][0])) if field.types[0] == gguf.GGUFValueType.UINT32 else writer.add_float32(field.name, float(field.parts[field.data[0]][0]))
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data.reshape([int(d) for d in reversed(tensor.shape.tolist())]))
    writer.add_tensor("blk.7.attn_q.weight", tensor.data.reshape(-1)[:8].copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.unlink()
    assert_refused(["quantize", "x.gguf", "-o", "out", "--scheme", "int8"], capsys, work, cache, match="not in the model: blk.7.attn_q.weight")


GGUF_STRUCTURE = {
    "wrong-magic": (raw_gguf([ARCH], [], magic=b"GGUX"), "magic bytes"),
    "version-9": (raw_gguf([ARCH], [], version=9), "version 9"),
    "more-keys-than-fit": (raw_gguf([ARCH], [], n_kv=10**6), "more than fit"),
    "key-count-over-bound": (raw_gguf([ARCH], [], n_kv=20_000) + b"\0" * 300_000, "65536 and 16384"),
    "unknown-value-type": (raw_gguf([gstr("general.architecture") + struct.pack("<I", 99)], []), "unknown value type 99"),
    "string-past-the-end": (raw_gguf([gstr("general.architecture") + struct.pack("<IQ", 8, 10**9)], []), "more than the file holds"),
    "key-length-past-the-end": (raw_gguf([struct.pack("<Q", 2**62)], []), "more than the file holds"),
    "huge-array": (raw_gguf([ARCH, gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**23)], []) + b"\0" * 64, "an array of 8388608 values"),
    "array-past-the-end": (raw_gguf([ARCH, gstr("x") + struct.pack("<IIQ", 9, 4, 10**6)], []), "more than the file holds"),
    "repeated-key": (raw_gguf([ARCH, ARCH], []), "appears twice"),
    "unknown-ggml-type": (raw_gguf([ARCH], [tensor_info("a", [8], 99)], b"\0" * 32), "unknown ggml type 99"),
    "five-dimensions": (raw_gguf([ARCH], [tensor_info("a", [1, 1, 1, 1, 8])], b"\0" * 32), "5 dimensions"),
    "tensor-past-the-end": (raw_gguf([ARCH], [tensor_info("a", [8], 0, 4096)], b"\0" * 32), "truncated or corrupt"),
    "giant-dimensions": (raw_gguf([ARCH], [tensor_info("a", [2**31, 2**31])], b"\0" * 32), "do not fit"),
    "partial-block": (raw_gguf([ARCH], [tensor_info("a", [33], 2)], b"\0" * 64), "do not fit its type"),
    "overlap": (raw_gguf([ARCH], [tensor_info("a", [8]), tensor_info("b", [8])], b"\0" * 32), "overlap"),
    "repeated-name": (raw_gguf([ARCH], [tensor_info("a", [8]), tensor_info("a", [8], 0, 32)], b"\0" * 64), "repeated names"),
    "misaligned": (raw_gguf([ARCH], [tensor_info("a", [1], 0, 4)], b"\0" * 32), "truncated or corrupt"),
    "bad-alignment": (raw_gguf([ARCH, gstr("general.alignment") + struct.pack("<II", 4, 3)], []), "not a power of two"),
    "no-architecture": (raw_gguf([], [tensor_info("a", [8])], b"\0" * 32), "general.architecture"),
}


@pytest.mark.parametrize("name", GGUF_STRUCTURE)
def test_gguf_structure(work, capsys, cache, name):
    data, match = GGUF_STRUCTURE[name]
    (work / "bad.gguf").write_bytes(data)
    command = ["quantize", "bad.gguf", "-o", "out"] if name == "no-architecture" else ["inspect", "bad.gguf"]
    assert_refused(command, capsys, work, cache, match=match)


def test_truncated_gguf(work, capsys, cache, gguf_file):
    (work / "cut.gguf").write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 2])
    assert_refused(["quantize", "cut.gguf", "-o", "out"], capsys, work, cache, match="truncated")


# -- safetensors sources -----------------------------------------------------------------------


SAFETENSORS = {
    "unknown-dtype": ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, 8, "dtype 'X9'"),
    "negative-shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "negative dimension"),
    "overlap": ({"a": f32([2], 0), "b": f32([2], 4)}, 12, "overlaps"),
    "gap": ({"a": f32([2], 0), "b": f32([2], 12)}, 20, "gap of 4 bytes"),
    "trailing-bytes": ({"a": f32([2], 0)}, 12, "4 bytes after its last tensor"),
    "shape-disagrees": ({"a": f32([2], 0) | {"shape": [3]}}, 8, "takes 12"),
}


@pytest.mark.parametrize("name", SAFETENSORS)
def test_safetensors_structure(work, capsys, tiny_model_dir, name):
    header, size, match = SAFETENSORS[name]
    model = copy_dir(tiny_model_dir, work)
    write_st(model / "model.safetensors", header, b"\0" * size)
    assert_refused(["inspect", "model"], capsys, work, match=match)


def test_safetensors_header_longer_than_the_file(work, capsys, tiny_model_dir):
    model = copy_dir(tiny_model_dir, work)
    (model / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    assert_refused(["quantize", "model", "-o", "out"], capsys, work, match="header claims")


def test_missing_tensor_is_never_random(work, capsys, tiny_model_dir):
    model = copy_dir(tiny_model_dir, work)
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert_refused(["quantize", "model", "-o", "out"], capsys, work, match="missing: model.layers.1.mlp.up_proj.weight")


def test_bin_checkpoint_missing_a_weight_is_refused(work, capsys, tiny_model_dir):
    """.bin checkpoints load eagerly through transformers: a weight it reports missing is refused, not random."""
    model = work / "bin"
    model.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model)
    state = load_file(tiny_model_dir / "model.safetensors")
    del state["model.layers.0.mlp.down_proj.weight"]
    torch.save(state, model / "pytorch_model.bin")
    assert_refused(["quantize", "bin", "-o", "out"], capsys, work, match="lacks weights its config needs: model.layers.0.mlp.down_proj.weight")


def test_f32_header_changed_to_i32(work, capsys, tiny_model_dir):
    model = copy_dir(tiny_model_dir, work)
    edit_header(model / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="I32"))
    assert_refused(["quantize", "model", "-o", "out"], capsys, work, match="model.norm.weight (I32)")


def test_stray_safetensors_file_without_index(work, capsys, tiny_model_dir):
    model = copy_dir(tiny_model_dir, work)
    save_file({"model.norm.weight": torch.zeros(96)}, model / "extra.safetensors")
    assert_refused(["quantize", "model", "-o", "out"], capsys, work, match="extra.safetensors beside model.safetensors")


def test_index_is_what_is_loaded(work, capsys, tiny_model_dir):
    """A stray file beside an index is not read; a tensor in a file the index does not place it in is refused."""
    model = copy_dir(tiny_model_dir, work)
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    index = {"weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors")}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"model.norm.weight": torch.full((96,), 7.0)}, model / "stray.safetensors")
    loaded = lowbit.load(model)
    assert torch.equal(loaded.model.norm.weight, tensors["model.norm.weight"])  # not the stray file's 7s
    del index["weight_map"]["model.norm.weight"]
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(["quantize", "model", "-o", "out"], capsys, work, match="does not list")
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(["quantize", "model", "-o", "out"], capsys, work, match="places in model-00002-of-00002.safetensors")
    index["weight_map"] = {**dict.fromkeys(tensors, "model-00001-of-00001.safetensors"), "model.extra": "model-00002-of-00002.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(["quantize", "model", "-o", "out"], capsys, work, match="which is not there")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c.pop("hidden_size"), "has no hidden_size"),
        (lambda c: c.update(model_type="llamax"), "unsupported architecture"),
        (lambda c: c.update(hidden_size="96"), "hidden_size must be a positive integer"),
        (lambda c: c.update(num_attention_heads=0), "num_attention_heads must be a positive integer"),
        (lambda c: c.pop("model_type"), "no model_type"),
        (lambda c: c.update(hidden_size=4096), "wrong shape"),
        (lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}), "quantized by another tool"),
    ],
    ids=["no-hidden-size", "unknown-model-type", "string-number", "zero-heads", "no-model-type", "bigger-than-the-files", "gptq"],
)
def test_bad_config(work, capsys, tiny_model_dir, change, match):
    model = copy_dir(tiny_model_dir, work)
    edit_config(model, change)
    assert_refused(["quantize", "model", "-o", "out"], capsys, work, match=match)


def test_config_that_is_not_json(work, capsys, tiny_model_dir):
    model = copy_dir(tiny_model_dir, work)
    (model / "config.json").write_text('{"model_type": "llama", ')
    assert_refused(["inspect", "model"], capsys, work, match="not valid JSON")


# -- native checkpoints ------------------------------------------------------------------------


def test_lowbit_parts_without_their_config_are_refused(work, capsys, native_dir):
    model = copy_dir(native_dir, work)
    edit_config(model, lambda c: c.pop("quantization_config"))
    for command in (["generate", "model", "-p", "hi", "-n", "2"], ["quantize", "model", "-o", "out"]):
        assert_refused(command, capsys, work, match="no lowbit quantization_config")


def test_manifest_format_with_the_same_layout(work, capsys, native_dir):
    """int4-g128 and int4-ch store the same parts for 96-wide rows: only the spec beside the parts tells."""
    model = copy_dir(native_dir, work)
    name = "model.layers.0.self_attn.q_proj"
    other = lowbit.get_format("int4-ch")
    edit_config(model, lambda c: c["quantization_config"]["modules"][name].update(format=other.name, spec=other.spec()))
    assert_refused(["generate", "model", "-p", "hi", "-n", "2"], capsys, work, match="its parts were written as")


def test_edited_part_fails_its_checksum(work, capsys, native_dir):
    model = copy_dir(native_dir, work)
    file = model / "model.safetensors"
    raw = bytearray(file.read_bytes())
    raw[-5] ^= 0xFF
    file.write_bytes(bytes(raw))
    assert_refused(["generate", "model", "-p", "hi", "-n", "2"], capsys, work, match="does not match the checksum")


def test_rewritten_without_checksums(work, capsys, native_dir):
    model = copy_dir(native_dir, work)
    save_file(load_file(model / "model.safetensors"), model / "model.safetensors", metadata={"format": "pt"})
    assert_refused(["eval", "model", "--window-length", "16", "--windows", "1"], capsys, work, match="no lowbit checksums")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m["modules"]["model.layers.0.mlp.up_proj"].pop("format"), "no format name"),
        (lambda m: m["modules"]["model.layers.0.mlp.up_proj"].update(spec={"family": "int", "bits": "x"}), "spec"),
        (lambda m: m["modules"].update({"model.layers.9.mlp.up_proj": m["modules"]["model.layers.0.mlp.up_proj"]}), "does not have"),
        (lambda m: m.update(modules=[]), "lists no quantized modules"),
    ],
    ids=["no-format", "malformed-spec", "unknown-module", "modules-not-a-dict"],
)
def test_damaged_manifest(work, capsys, native_dir, change, match):
    model = copy_dir(native_dir, work)
    edit_config(model, lambda c: change(c["quantization_config"]))
    assert_refused(["inspect", "model"], capsys, work, match=match)
    assert_refused(["generate", "model", "-p", "hi", "-n", "2"], capsys, work)


def test_native_plain_tensor_changed_to_integers(work, capsys, native_dir):
    model = copy_dir(native_dir, work)
    same_size = {"F16": "I16", "BF16": "I16", "F32": "I32"}  # kept tensors are stored in 16 bits by default
    edit_header(model / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype=same_size[h["model.norm.weight"]["dtype"]]))
    assert_refused(["generate", "model", "-p", "hi", "-n", "2"], capsys, work, match="model.norm.weight is stored as I")


# -- non-finite weights ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_weight_is_named(work, capsys, tiny_model_dir, value):
    model = copy_dir(tiny_model_dir, work)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][3, :2] = value
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    error = assert_refused(["quantize", "model", "-o", "out", "--scheme", "nf4-dq"], capsys, work, match="model.layers.1.self_attn.o_proj.weight holds 2")
    assert "--allow-nonfinite" in error
    code, _, err = run(["quantize", "model", "-o", "out", "--scheme", "nf4-dq", "--allow-nonfinite"], capsys)
    assert code == 0 and "replaced 2 NaN or infinite value(s) with zeros" in err
    q = lowbit.load(work / "out").model.layers[1].self_attn.o_proj.dequantize_weight(torch.float32)
    assert torch.isfinite(q).all()


def test_formats_never_store_a_nonfinite_scale():
    weight = torch.randn(8, 96)
    weight[2, 5] = float("nan")
    for name in ("int4-g128", "nf4-dq", "fp8-tensor", "mxfp4", "int8", "bf16"):
        with pytest.raises(LowbitError, match="NaN or infinite"):
            lowbit.get_format(name).quantize(weight)
    with pytest.raises(LowbitError, match="beyond"):
        lowbit.get_format("fp16").quantize(torch.full((2, 4), 1e30))
    scale = lowbit.get_format("int4-g128").quantize(torch.full((2, 4), 1e30)).parts["scale"]
    assert torch.isfinite(scale.float()).all()


# -- outputs -----------------------------------------------------------------------------------


def test_overwrite_never_replaces_a_directory_lowbit_did_not_write(work, capsys, tiny_model_dir):
    (work / "photos").mkdir()
    (work / "photos" / "cat.jpg").write_bytes(b"meow")
    assert_refused(["quantize", str(tiny_model_dir), "-o", "photos", "--overwrite"], capsys, work, match="not written by lowbit")


def test_overwrite_never_replaces_the_input(work, capsys, native_dir):
    copy_dir(native_dir, work)  # as work/model
    assert_refused(["export", "model", "-o", "model", "--overwrite"], capsys, work, match="model being read")
    assert_refused(["export", "model", "-o", ".", "--overwrite"], capsys, work)


def test_existing_output_without_overwrite(work, capsys, tiny_model_dir):
    (work / "out").mkdir()
    assert_refused(["quantize", str(tiny_model_dir), "-o", "out"], capsys, work, match="already exists")


def test_output_whose_parent_is_a_file(work, capsys, tiny_model_dir):
    (work / "file").write_text("x")
    assert_refused(["quantize", str(tiny_model_dir), "-o", "file/out"], capsys, work, match="is a file, not a directory")


def test_unwritable_output(work, capsys, tiny_model_dir):
    assert_refused(["quantize", str(tiny_model_dir), "-o", "/proc/lowbit-out"], capsys, work, match="not writable")


def test_full_disk_is_refused_before_any_work(work, capsys, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(lowbit.api, "quantize_model", lambda *a, **k: pytest.fail("quantized before the space check"))
    assert_refused(["quantize", str(tiny_model_dir), "-o", "out"], capsys, work, match="not enough disk space")


def test_directory_appearing_during_the_run_is_not_replaced(work, capsys, tiny_model_dir, monkeypatch):
    from lowbit.export import native

    real = native.save_file

    def and_meanwhile(tensors, filename, metadata=None):
        (work / "out").mkdir(exist_ok=True)
        (work / "out" / "mine.txt").write_text("keep me")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(native, "save_file", and_meanwhile)
    code, _, err = run(["quantize", str(tiny_model_dir), "-o", "out", "--scheme", "int8"], capsys)
    assert code == 2 and "already exists" in err
    assert sorted(p.name for p in work.iterdir()) == ["out"] and (work / "out" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["/proc/r.json", "dir", "file/r.json"], ids=["unwritable", "a-directory", "parent-is-a-file"])
def test_json_report_checked_before_any_work(work, capsys, native_dir, monkeypatch, where):
    (work / "dir").mkdir()
    (work / "file").write_text("x")
    monkeypatch.setattr(lowbit, "inspect", lambda *a, **k: pytest.fail("inspected before the report path was checked"))
    assert_refused(["inspect", str(native_dir), "--json", where], capsys, work, match="cannot write")


def test_failed_second_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "lowbit"}}))
    real = Path.rename

    def fail_into_place(self, target):
        if Path(target) == out and ".partial-" in self.name:
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", fail_into_place)
    with pytest.raises(OSError):
        with atomic.atomic_directory(out, overwrite=True) as temporary:
            (temporary / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "config.json").is_file() and not (out / "new").exists()


def test_leftovers_of_dead_runs_are_cleaned_up(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f".out.partial-{dead}").mkdir()
    (tmp_path / f".out.partial-{dead}" / "model.safetensors").write_bytes(b"half")
    old = tmp_path / f".out.old-{dead}"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "lowbit"}}))
    (tmp_path / ".other.partial-1").mkdir()  # another output's: not ours to touch
    with pytest.warns(UserWarning) as warned:
        done = atomic.recover_leftovers(tmp_path / "out")
    assert len(done) == 2 and len(warned) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-1", "out"]  # the old output was put back
    assert atomic.is_lowbit_output(tmp_path / "out")


def test_output_dot_with_overwrite(work, capsys, tiny_model_dir, native_dir):
    out = copy_dir(native_dir, work, "q")
    os.chdir(out)
    code, _, err = run(["quantize", str(tiny_model_dir), "-o", ".", "--overwrite", "--scheme", "int8"], capsys)
    assert code == 0, err
    os.chdir(work)
    assert sorted(p.name for p in work.iterdir()) == ["q"]
    assert lowbit.load(work / "q").lowbit_manifest["plan"]["name"] == "int8"


# -- arguments and resources -------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, match",
    [
        (["generate", "{native}", "-p", "hi", "-n", "0"], "at least 1"),
        (["quantize", "{tiny}", "-o", "out", "--device", "cuda:99"], "device"),
        (["quantize", "{tiny}", "-o", "out", "--device", "tpu"], "device"),
        (["quantize", "{tiny}", "-o", "out", "--scheme", "int4-g128+clip", "--calibration", "{text}", "--calibration-samples", "10000000"], "GB of activations"),
        (["quantize", "{tiny}", "-o", "out", "--scheme", "int4-g128+clip", "--calibration-samples", "0"], "at least 1"),
        (["quantize", "{tiny}", "-o", "out", "--scheme", "int9"], "int9"),
        (["quantize", "{tiny}", "-o", "out", "--scheme", "missing-plan.yaml"], "missing-plan.yaml"),
        (["quantize", "{tiny}", "-o", "out", "--scheme", "{list_plan}"], "pattern must be a string"),
        (["quantize", "{tiny}", "-o", "out", "--scheme", "int4-g128+clip", "--calibration", "nothing.txt"], "nothing.txt"),
        (["quantize", "nothing/here/x", "-o", "out"], "no such model"),
        (["eval", "{native}", "--data", "{text}", "--window-length", "1"], "at least 2"),
        (["eval", "{native}", "--data", "{text}", "--window-length", "100000"], "shorter than one window"),
        (["size", "{tiny}", "--context", "1e9"], "invalid int value"),
        (["size", "nothing.json"], "no such model"),
        (["inspect", "{text}"], "not a GGUF"),
        (["compare", "{tiny}", "--schemes", "int8,int99"], "int99"),
    ],
    ids=[
        "generate-n-0", "missing-gpu", "unknown-device", "calibration-beyond-memory", "calibration-zero", "unknown-scheme",
        "missing-plan", "plan-pattern-list", "missing-calibration-text", "missing-model", "window-1", "window-too-long",
        "context-1e9", "size-missing", "inspect-text-file", "compare-unknown-scheme",
    ],
)  # fmt: skip
def test_bad_arguments(work, capsys, tiny_model_dir, native_dir, eval_text_file, argv, match):
    (work / "plan.yaml").write_text('rules:\n  - pattern: ["a", "b"]\n    format: int8\n')
    names = {"native": native_dir, "tiny": tiny_model_dir, "text": eval_text_file, "list_plan": work / "plan.yaml"}
    assert_refused([a.format(**names) for a in argv], capsys, work, match=match)


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_batch_size_zero(work, capsys, native_dir, tiny_model_dir, eval_text_file, command):
    model = native_dir if command == "eval" else tiny_model_dir
    argv = [command, model, "--data", eval_text_file, "--window-length", "16", "--batch-size", "0"]
    assert_refused(argv, capsys, work, match="batch size")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: lowbit.quantize(m, None), "got None"),
        (lambda m: lowbit.quantize(m, "int4-g128+clip", calibration=torch.zeros(4)), "(samples, length)"),
        (lambda m: lowbit.quantize(m, "int4-g128+clip", calibration=torch.zeros(2, 8)), "int64 or int32"),
        (lambda m: lowbit.quantize(m, "int4-g128+clip", calibration=torch.full((2, 8), 256)), "vocabulary"),
        (lambda m: lowbit.quantize(m, "int4-g128+clip", calibration=torch.full((2, 8), -1)), "vocabulary"),
    ],
    ids=["scheme-none", "calibration-1d", "calibration-float", "calibration-past-vocab", "calibration-negative"],
)
def test_api_misuse_is_a_lowbit_error(call, match):
    with pytest.raises(LowbitError, match=match.replace("(", r"\(").replace(")", r"\)")):
        call(tiny_model("llama"))


def test_unexpected_error_is_one_line_saying_it_is_a_bug(capsys, monkeypatch):
    monkeypatch.setattr(lowbit, "inspect", lambda *a, **k: {}["boom"])
    code, _, err = run(["inspect", "x"], capsys)
    assert code == 70 and err.count("error:") == 1 and "Traceback" not in err
    assert "a bug" in err and "https://github.com/lowbit/lowbit/issues" in err and "--debug" in err
    code, _, err = run(["--debug", "inspect", "x"], capsys)
    assert code == 70 and "Traceback" in err and "KeyError: 'boom'" in err


# -- signals, pipes and memory (subprocesses) --------------------------------------------------


SLOW_SAVE = """
import sys, time
sys.path.insert(0, {tests!r})
from lowbit.export import native
real = native.save_file
def slow(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    open({mark!r}, "w").close()
    time.sleep(120)
native.save_file = slow
from lowbit.cli import main
sys.exit(main(["quantize", {model!r}, "-o", {out!r}, "--scheme", "int8"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signal_during_save(tmp_path, capsys, tiny_model_dir, sig):
    mark, out = tmp_path / "saving", tmp_path / "out"
    script = SLOW_SAVE.format(tests=str(TESTS), mark=str(mark), model=str(tiny_model_dir), out=str(out))
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() is not None else "timeout"
        time.sleep(0.1)
    partial = tmp_path / f".out.partial-{process.pid}"
    assert partial.is_dir()
    process.send_signal(sig)
    code = process.wait(60)
    err = process.stderr.read()
    mark.unlink()
    if sig == signal.SIGTERM:
        assert code == 143 and "terminated; nothing was written" in err and "Traceback" not in err
        assert list(tmp_path.iterdir()) == []
        return
    assert code == -signal.SIGKILL and partial.is_dir()  # nothing could run: the next run cleans up
    code, _, err = run(["quantize", tiny_model_dir, "-o", out, "--scheme", "int8"], capsys)
    assert code == 0 and f"removed {partial}, left by an interrupted run" in err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_closed_pipe_ends_quietly(tiny_model_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "lowbit", "size", str(tiny_model_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    process.stdout.close()  # like `| head` that has already exited
    err = process.stderr.read().decode()
    assert process.wait(60) == 0 and err == "", err


MEMORY_BOUND = """
import json, resource, sys
from contextlib import redirect_stderr
from io import StringIO
from lowbit.cli import main
import lowbit.sources, lowbit.export.native, transformers, gguf  # everything a load needs, before the limit
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))   # 1 GiB beyond what is mapped now
results = {}
for argv in json.loads(sys.argv[1]):
    err = StringIO()
    with redirect_stderr(err):
        code = main(argv)
    results[" ".join(argv)] = [code, err.getvalue()]
print(json.dumps(results))
"""


def test_memory_stays_bounded_on_crafted_files(tmp_path, tiny_model_dir):
    """Files that claim huge models (allocated 23 GB before) are refused within 1 GiB of address space."""
    (tmp_path / "arch-only.gguf").write_bytes(raw_gguf([ARCH], []))
    big = [kv_str("general.architecture", "llama")] + [
        gstr(f"llama.{key}") + struct.pack("<II", 4, value)
        for key, value in {"block_count": 80, "embedding_length": 8192, "feed_forward_length": 28672, "attention.head_count": 64,
                           "context_length": 4096, "vocab_size": 128256}.items()
    ]  # fmt: skip
    (tmp_path / "70b-claim.gguf").write_bytes(raw_gguf(big, [tensor_info("token_embd.weight", [8192, 128256])], b""))
    (tmp_path / "70b-one-tensor.gguf").write_bytes(raw_gguf(big, [tensor_info("output_norm.weight", [8192])], b"\0" * 32768))
    (tmp_path / "many-keys.gguf").write_bytes(raw_gguf([ARCH], [], n_kv=2_000_000) + b"\0" * 30_000_000)
    (tmp_path / "huge-array.gguf").write_bytes(raw_gguf([ARCH, gstr("a") + struct.pack("<IIQ", 9, 8, 3 * 10**6)], []) + (gstr("x") * 3 * 10**6)[:50_000_000])
    claim = copy_dir(tiny_model_dir, tmp_path, "70b-config")
    edit_config(claim, lambda c: c.update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, vocab_size=128256, num_attention_heads=64, head_dim=128))
    files = sorted(str(p) for p in tmp_path.iterdir())
    commands = [["inspect", f] for f in files] + [["quantize", f, "-o", str(tmp_path / "out")] for f in files]
    env = {**os.environ, "LOWBIT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", MEMORY_BOUND, json.dumps(commands)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for command, (code, err) in results.items():  # inspect lists what a directory holds, whatever its config says
        assert code == 2 or (command.startswith("inspect") and code == 0), (command, err)
        assert err.count("error:") == code // 2 and "internal error" not in err, (command, err)
