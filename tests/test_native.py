"""The native checkpoint (``lowbit/export/native.py``): save -> load is bit-exact, the manifest
says what was done, the bytes reported are the bytes written, writes are atomic, and a
damaged checkpoint is refused with a LowbitError.

The file's contents are read back independently of lowbit: the safetensors header is
parsed by hand (8-byte little-endian length, JSON), so the byte counts compared against
``QTensor.nbytes`` and ``Format.storage_bytes`` are the bytes really on disk.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model, tiny_tokens
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.eval import weight_bytes
from lowbit.eval.memory import linear_weight_stats
from lowbit.export import native
from lowbit.export.native import INDEX_FILE, load_native, save_native
from lowbit.formats import get_format
from lowbit.inspection import inspect_checkpoint
from lowbit.nn import QuantLinear, quantized_linears
from lowbit.plan import Plan, make_rule

SAFETENSORS_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def read_header(file: Path) -> dict:
    """The tensor entries of a safetensors file, read by hand."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def all_headers(directory: Path) -> dict:
    entries = {}
    for file in sorted(directory.glob("*.safetensors")):
        entries.update(read_header(file))
    return entries


def quantized(arch: str, scheme, **kwargs) -> nn.Module:
    return lowbit.quantize(tiny_model(arch, **kwargs), scheme, progress=False)


def logits(model: nn.Module, tokens: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_tokens() if tokens is None else tokens).logits


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial" in p.name or ".old" in p.name)


ROUND_TRIPS = [
    ("llama", "int4-g128"),  # tied embeddings; 96 and 200 input features: partial groups of 128
    ("qwen2", "int4-g128"),  # q/k/v biases
    ("qwen2", "int3-g128"),
    ("phi3", "nf4-dq"),  # fused qkv_proj / gate_up_proj
    ("gemma2", "fp8"),
    ("llama", "mxfp4"),
    ("mistral", "bf16"),
    ("gemma", "int8"),
]


@pytest.mark.parametrize("arch, scheme", ROUND_TRIPS)
def test_save_load_is_bit_exact(arch, scheme, tmp_path):
    model = quantized(arch, scheme)
    expected = logits(model)
    out = save_native(model, tmp_path / "out")
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert leftovers(tmp_path) == []

    loaded = lowbit.load(out)
    assert torch.equal(logits(loaded), expected)
    # every quantized module comes back as a QuantLinear with identical parts and bias
    before, after = quantized_linears(model), quantized_linears(loaded)
    assert set(before) == set(after) and before
    for name, module in before.items():
        again = after[name]
        assert again.format_name == module.format_name == get_format(scheme).name
        assert set(again.part_names) == set(module.part_names)
        for part in module.part_names:
            a, b = getattr(module, "weight_" + part), getattr(again, "weight_" + part)
            assert a.dtype == b.dtype and torch.equal(a, b), (name, part)
            assert not isinstance(b, nn.Parameter)
        assert (module.bias is None) == (again.bias is None)
        if module.bias is not None:
            assert torch.equal(module.bias, again.bias)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert loaded.lowbit_manifest == json.loads(json.dumps(model.lowbit_manifest))
    assert weight_bytes(loaded) == weight_bytes(model)
    # a loaded checkpoint generates like the model it was saved from
    prompt = tiny_tokens()[:1, :5]
    kwargs = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(loaded.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_manifest_in_config(tmp_path):
    plan = Plan(
        [
            make_rule("lm_head", "keep"),
            make_rule("*.mlp.down_proj", "int8"),
            make_rule("*.self_attn.*", {"format": "nf4", "clip_search": True, "clip_grid": 5}),
            make_rule("*", "int4-g32"),
        ],
        name="mixed",
    )
    model = quantized("qwen2", plan)
    save_native(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    manifest = config["quantization_config"]
    assert manifest["quant_method"] == "lowbit"
    assert manifest["lowbit_version"] == lowbit.__version__
    assert manifest["plan"] == plan.to_dict()
    assert manifest["plan"]["name"] == "mixed"
    assert manifest["calibration"] is None
    assert config["model_type"] == "qwen2"
    modules = manifest["modules"]
    assert set(modules) == set(quantized_linears(model))
    for name, entry in modules.items():
        entry = dict(entry)
        assert entry.pop("spec") == get_format(entry["format"]).spec()  # the typed format beside its name
        if name.endswith("down_proj"):
            assert entry == {"format": "int8", "algorithm": "rtn"}
        elif ".self_attn." in name:
            assert entry == {"format": "nf4", "algorithm": "rtn", "clip_search": True, "clip_grid": 5}
        else:
            assert entry == {"format": "int4-g32", "algorithm": "rtn"}, name
    assert "lm_head" not in modules
    # and it loads back with the same per-module formats
    loaded = lowbit.load(tmp_path / "out")
    assert {n: m.format_name for n, m in quantized_linears(loaded).items()} == {n: e["format"] for n, e in modules.items()}
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize(
    "arch, scheme", [("llama", "int4-g128"), ("qwen2", "int3-g128"), ("phi3", "nf4-dq"), ("gemma2", "mxfp4"), ("mistral", "fp8")]
)
def test_bytes_written_equal_bytes_reported(arch, scheme, tmp_path):
    model = quantized(arch, scheme)
    save_native(model, tmp_path / "out")
    file = tmp_path / "out" / "model.safetensors"
    header = read_header(file)
    data_bytes = file.stat().st_size - 8 - struct.unpack("<Q", file.read_bytes()[:8])[0]
    fmt = get_format(scheme)
    decoder_bytes = decoder_weights = 0
    for name, module in quantized_linears(model).items():
        keys = sorted(k for k in header if k.startswith(name + ".weight"))
        assert keys == sorted(f"{name}.weight_{p}" for p in module.part_names)  # never a dense weight
        written = 0
        for key in keys:
            entry = header[key]
            start, end = entry["data_offsets"]
            part = getattr(module, key[len(name) + 1 :])
            assert list(part.shape) == entry["shape"] and SAFETENSORS_DTYPES[entry["dtype"]] == part.dtype
            written += end - start
        shape = (module.out_features, module.in_features)
        assert written == module.qtensor.nbytes == fmt.storage_bytes(shape), name
        decoder_bytes += written
        decoder_weights += shape[0] * shape[1]
    assert linear_weight_stats(model) == (decoder_bytes, decoder_weights)
    # every tensor written is counted by weight_bytes, tied tensors once
    assert sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()) == data_bytes == weight_bytes(model)
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in header and "model.embed_tokens.weight" in header


def test_sharded_checkpoint_round_trip(tmp_path):
    model = quantized("gemma2", "int4-g128")
    expected = logits(model)
    out = save_native(model, tmp_path / "out", max_shard_bytes=40_000)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((out / INDEX_FILE).read_text())
    headers = {s.name: read_header(s) for s in shards}
    assert index["weight_map"] == {key: name for name, header in headers.items() for key in header}
    total = sum(e["data_offsets"][1] - e["data_offsets"][0] for h in headers.values() for e in h.values())
    assert index["metadata"]["total_size"] == total == weight_bytes(model)
    for name, header in headers.items():  # no shard over the limit unless one tensor is
        size = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
        assert size <= 40_000 or len(header) == 1, name
    loaded = lowbit.load(out)
    assert torch.equal(logits(loaded), expected)
    # inspect reads every shard's header
    report = inspect_checkpoint(out)
    assert report["bytes"] == total
    assert report["formats"]["int4-g128"]["tensors"] == len(quantized_linears(model))


def test_tied_lm_head_quantized_round_trip(tmp_path):
    model = quantized("llama", Plan([make_rule("*", "int8")]))
    assert isinstance(model.lm_head, QuantLinear) and not model.config.tie_word_embeddings
    save_native(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = lowbit.load(tmp_path / "out")
    assert isinstance(loaded.lm_head, QuantLinear)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(logits(loaded), logits(model))


def test_tokenizer_is_saved_and_loaded(tmp_path, byte_tokenizer):
    model = quantized("llama", "int8")
    lowbit.save(model, tmp_path / "out", tokenizer=byte_tokenizer)
    loaded = lowbit.load(tmp_path / "out")
    text = "lowbit, tiny!"
    assert loaded.lowbit_tokenizer(text)["input_ids"] == byte_tokenizer(text)["input_ids"]


def test_saving_an_unquantized_model_is_refused(tmp_path):
    with pytest.raises(LowbitError, match="not quantized by lowbit"):
        save_native(tiny_model("llama"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- atomic writes --------------------------------------------------------------------------


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    first = quantized("llama", "int8")
    save_native(first, out)
    (out / "keep-me.txt").write_text("old")
    old_bytes = (out / "model.safetensors").read_bytes()
    second = quantized("llama", "int4-g32")
    with pytest.raises(LowbitError, match="already exists.*overwrite"):
        save_native(second, out)
    assert (out / "keep-me.txt").read_text() == "old"
    assert (out / "model.safetensors").read_bytes() == old_bytes
    assert leftovers(tmp_path) == []

    save_native(second, out, overwrite=True)
    assert not (out / "keep-me.txt").exists()  # replaced, not merged
    assert torch.equal(logits(lowbit.load(out)), logits(second))
    assert leftovers(tmp_path) == []


def test_existing_file_is_never_replaced(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(LowbitError, match="not a directory"):
        save_native(quantized("llama", "int8"), target, overwrite=True)
    assert target.read_text() == "a file"


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_interrupted_save_leaves_nothing_behind(error, existing, tmp_path, monkeypatch):
    model = quantized("qwen2", "int4-g128")
    out = tmp_path / "out"
    if existing:
        old = quantized("qwen2", "int8")
        save_native(old, out)
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second shard: the first one is already on disk
            Path(filename).write_bytes(b"half a shard")
            raise error
        return safetensors.torch.save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(native, "save_file", failing_save_file)
    with pytest.raises(type(error)):
        save_native(model, out, overwrite=True, max_shard_bytes=40_000)
    assert len(calls) == 2
    assert leftovers(tmp_path) == []
    if existing:
        assert torch.equal(logits(lowbit.load(out)), logits(old))  # the old checkpoint is intact
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    else:
        assert list(tmp_path.iterdir()) == []


# -- damaged checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("native") / "good"
    save_native(quantized("llama", "int4-g128"), out)
    return out


@pytest.fixture
def damaged(saved_checkpoint, tmp_path) -> Path:
    copy_ = tmp_path / "damaged"
    shutil.copytree(saved_checkpoint, copy_)
    return copy_


def rewrite_tensors(directory: Path, change) -> None:
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def rewrite_manifest(directory: Path, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config["quantization_config"])
    (directory / "config.json").write_text(json.dumps(config))


Q_PROJ = "model.layers.0.self_attn.q_proj"


def test_good_checkpoint_loads(saved_checkpoint):
    assert isinstance(lowbit.load(saved_checkpoint).model.layers[0].self_attn.q_proj, QuantLinear)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_safetensors_is_refused(damaged, keep):
    file = damaged / "model.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(int(size * keep))
    with pytest.raises(LowbitError, match="not a valid safetensors file"):
        lowbit.load(damaged)


def test_part_with_wrong_shape_is_refused(damaged):
    rewrite_tensors(damaged, lambda t: t.__setitem__(f"{Q_PROJ}.weight_packed", t[f"{Q_PROJ}.weight_packed"][:-1].clone()))
    with pytest.raises(LowbitError, match=r"q_proj should hold int4-g128 parts.*found.*corrupt"):
        lowbit.load(damaged)


@pytest.mark.parametrize("change", ["transposed-packed", "bf16-scale"])
def test_part_with_same_bytes_but_wrong_layout_is_refused(damaged, change):
    def transpose(t):
        packed = t[f"{Q_PROJ}.weight_packed"]
        t[f"{Q_PROJ}.weight_packed"] = packed.reshape(packed.shape[1], packed.shape[0]).clone()

    def bf16(t):
        t[f"{Q_PROJ}.weight_scale"] = t[f"{Q_PROJ}.weight_scale"].to(torch.bfloat16)

    rewrite_tensors(damaged, transpose if change == "transposed-packed" else bf16)
    try:
        model = lowbit.load(damaged)
    except LowbitError:
        return
    logits(model)  # the damage must have been caught at load time
    raise AssertionError("a checkpoint with a mis-shaped part loaded")


@pytest.mark.parametrize("new_format", ["int8", "nf4", "int4-sym-g128", "int4-g64"])
def test_manifest_format_edit_is_refused(damaged, new_format):
    rewrite_manifest(damaged, lambda m: m["modules"][Q_PROJ].update(format=new_format, spec=get_format(new_format).spec()))
    with pytest.raises(LowbitError, match=rf"should hold {new_format} parts .* for shape \(96, 96\).*corrupt"):
        lowbit.load(damaged)


def test_manifest_name_and_spec_that_disagree_are_refused(damaged):
    rewrite_manifest(damaged, lambda m: m["modules"][Q_PROJ].__setitem__("format", "int8"))
    with pytest.raises(LowbitError, match="names format 'int8' but its spec describes 'int4-g128'.*corrupt"):
        lowbit.load(damaged)


def test_manifest_unknown_format_is_refused(damaged):
    def edit(manifest):
        manifest["modules"][Q_PROJ]["format"] = "int9-g7"
        del manifest["modules"][Q_PROJ]["spec"]  # a checkpoint from before specs: the name alone

    rewrite_manifest(damaged, edit)
    with pytest.raises(LowbitError, match="unknown format 'int9-g7'"):
        lowbit.load(damaged)


def test_missing_tensor_is_refused(damaged):
    rewrite_tensors(damaged, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(LowbitError, match=r"lacks tensors.*model\.norm\.weight"):
        lowbit.load(damaged)


def test_missing_quantized_module_is_refused(damaged):
    def drop(t):
        for key in [k for k in t if k.startswith("model.layers.1.mlp.up_proj.")]:
            del t[key]

    rewrite_tensors(damaged, drop)
    with pytest.raises(LowbitError, match=r"up_proj should hold int4-g128 parts .* found \{\}"):
        lowbit.load(damaged)


def test_unexpected_tensor_is_refused(damaged):
    rewrite_tensors(damaged, lambda t: t.__setitem__("model.layers.0.extra_thing", torch.zeros(3)))
    with pytest.raises(LowbitError, match="does not have.*extra_thing"):
        lowbit.load(damaged)


def test_config_without_lowbit_manifest_is_not_native(damaged):
    config = json.loads((damaged / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="not a lowbit checkpoint"):
        load_native(damaged)


def test_truncated_config_is_refused(damaged):
    text = (damaged / "config.json").read_text()
    (damaged / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(LowbitError, match="not valid JSON"):
        lowbit.load(damaged)


@pytest.mark.parametrize("change", ["unknown-module", "no-modules"])
def test_malformed_manifest_is_refused(damaged, change):
    def edit(manifest):
        if change == "unknown-module":
            manifest["modules"]["model.layers.7.mlp.up_proj"] = {"format": "int4-g128", "algorithm": "rtn"}
        else:
            del manifest["modules"]

    rewrite_manifest(damaged, edit)
    with pytest.raises(LowbitError):
        lowbit.load(damaged)
