"""Importance matrices in llama.cpp's format (``lowbit imatrix``).

- the accumulation equals a float64 reference (sum of x² per input channel, tokens counted),
  also for fp16 inputs whose squares overflow fp16;
- importance is ``sums / counts`` with llama-quantize's 1 for an expert that saw no token;
- the GGUF file is llama.cpp's layout, read back independently with gguf-py's reader (no
  architecture key, ``general.type``, the three ``imatrix.*`` keys as uint32 / string array,
  F32 ``.in_sum2`` ``[features, experts]`` and ``.counts`` ``[1, experts]``, sorted names);
- the legacy ``.dat`` format is read as llama.cpp reads it, from bytes written by a reference
  writer here that follows ``save_imatrix_legacy``; corrupt files are clear errors;
- the statistics of every linear of every tested architecture equal those of an independent
  path (the whole model run at once with hooks, in float64), under llama.cpp's tensor names;
- ``lowbit.imatrix`` / ``lowbit imatrix`` take llama-imatrix's chunks (consecutive windows,
  BOS first when the tokenizer adds one), stream a model from disk, refuse short text and an
  existing output before any work.

Heavy (``-m heavy``, needs llama.cpp's tools from ``scripts/llama_cpp_tools.sh`` and
``../shared/data``): ``llama-quantize --imatrix`` accepts our file for SmolLM2, and our
matrix matches ``llama-imatrix``'s own on the same chunks, tensor by tensor.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import lowbit
from lowbit.algorithms.imatrix import ImportanceEntry, ImportanceMatrix
from lowbit.errors import LowbitError
from lowbit.gguf_names import gguf_architecture, tensor_names
from lowbit.imatrix_file import read_imatrix, read_legacy_imatrix, write_imatrix
from lowbit.importance import collect_importance
from lowbit.nn import is_linear
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokens

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# -- tensor code ----------------------------------------------------------------------------------


def test_entry_accumulates_squares_and_tokens_like_a_float64_reference():
    torch.manual_seed(0)
    batches = [torch.randn(3, 7, 13), torch.randn(5, 13) * 4, torch.randn(1, 1, 1, 13)]
    entry = ImportanceEntry.zeros(13)
    for x in batches:
        entry.add(x)
    rows = torch.cat([x.reshape(-1, 13) for x in batches]).double()
    torch.testing.assert_close(entry.sums[0].double(), rows.square().sum(0), rtol=1e-6, atol=0)
    assert entry.counts.tolist() == [rows.shape[0]]
    torch.testing.assert_close(entry.importance()[0].double(), rows.square().mean(0), rtol=1e-6, atol=0)


def test_fp16_inputs_cannot_overflow():
    x = torch.full((64, 5), 300.0, dtype=torch.float16)  # 300² = 90,000 > fp16's 65,504
    entry = ImportanceEntry.zeros(5)
    entry.add(x)
    assert torch.isfinite(entry.sums).all() and entry.sums.dtype == torch.float32
    assert entry.sums[0, 0].item() == 64 * 90_000.0


def test_entry_refuses_wrong_widths():
    with pytest.raises(ValueError, match="inputs have 4 channels, this entry 5"):
        ImportanceEntry.zeros(5).add(torch.ones(2, 4))
    with pytest.raises(ValueError, match="2 rows of sums but 3 counts"):
        ImportanceEntry(torch.ones(2, 4), torch.ones(3))


def test_importance_divides_by_counts_and_gives_unseen_experts_ones():
    """llama-quantize: ``sums / count`` per expert, and 1 for each channel of an expert with count 0."""
    entry = ImportanceEntry(torch.tensor([[2.0, 4.0, 6.0], [5.0, 5.0, 5.0]]), torch.tensor([2.0, 0.0]))
    assert entry.importance().tolist() == [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]
    matrix = ImportanceMatrix({"blk.0.ffn_up_exps.weight": entry, "blk.0.attn_q.weight": ImportanceEntry(torch.tensor([3.0, 6.0]), torch.tensor([3.0]))})
    assert matrix.importance("blk.0.attn_q.weight").tolist() == [1.0, 2.0]
    assert matrix.importance("blk.0.attn_q").tolist() == [1.0, 2.0]  # the ".weight" may be left out
    assert matrix.importance("blk.0.ffn_up_exps").shape == (2, 3)
    assert matrix.importance("blk.9.attn_q") is None


def test_merging_adds_sums_and_counts():
    a = ImportanceMatrix({"x": ImportanceEntry(torch.tensor([1.0, 2.0]), torch.tensor([1.0]))}, ["a.txt"], 1, 8)
    b = ImportanceMatrix(
        {"x": ImportanceEntry(torch.tensor([3.0, 4.0]), torch.tensor([3.0])), "y": ImportanceEntry(torch.ones(3), torch.ones(1))},
        ["b.txt"], 2, 8,
    )  # fmt: skip
    merged = a.merged(b)
    assert merged.entries["x"].sums.tolist() == [[4.0, 6.0]] and merged.entries["x"].counts.tolist() == [4.0]
    assert set(merged.entries) == {"x", "y"} and merged.datasets == ["a.txt", "b.txt"] and merged.chunk_count == 3
    with pytest.raises(ValueError, match="cannot merge"):
        a.entries["x"].merged(b.entries["y"])


# -- llama.cpp tensor names -----------------------------------------------------------------------


def test_gguf_names_of_the_tested_families():
    llama = tensor_names("llama", 30)
    assert llama["model.layers.29.self_attn.q_proj"] == "blk.29.attn_q.weight"
    assert llama["model.layers.0.self_attn.o_proj.weight"] == "blk.0.attn_output.weight"
    assert llama["model.layers.3.mlp.down_proj"] == "blk.3.ffn_down.weight"
    assert llama["lm_head"] == "output.weight" and llama["model.embed_tokens"] == "token_embd.weight"
    assert llama.get("model.layers.0.self_attn.q_proj.bias") == "blk.0.attn_q.bias"
    assert llama.get("model.layers.0.something_new") is None
    with pytest.raises(LowbitError, match="no GGUF name in llama.cpp's llama architecture"):
        llama["model.layers.0.something_new"]
    phi3 = tensor_names("phi3", 2)
    assert phi3["model.layers.1.self_attn.qkv_proj"] == "blk.1.attn_qkv.weight"
    assert phi3["model.layers.1.mlp.gate_up_proj"] == "blk.1.ffn_up.weight"  # llama.cpp keeps it fused as ffn_up
    assert gguf_architecture("mistral") == "llama" and gguf_architecture("gemma2") == "gemma2"
    with pytest.raises(LowbitError, match="no architecture for model type 'not-a-model'"):
        gguf_architecture("not-a-model")


# -- files ----------------------------------------------------------------------------------------


def _matrix() -> ImportanceMatrix:
    generator = torch.Generator().manual_seed(3)
    return ImportanceMatrix(
        {
            "blk.1.attn_q.weight": ImportanceEntry(torch.rand(1, 96, generator=generator) * 50, torch.tensor([60.0])),
            "blk.0.ffn_down.weight": ImportanceEntry(torch.rand(1, 200, generator=generator), torch.tensor([60.0])),
            "blk.0.ffn_up_exps.weight": ImportanceEntry(torch.rand(3, 40, generator=generator), torch.tensor([7.0, 0.0, 53.0])),
        },
        ["calib.txt", "more.jsonl"], 3, 20,
    )  # fmt: skip


def test_gguf_file_has_llama_cpps_layout(tmp_path):
    matrix = _matrix()
    path = write_imatrix(matrix, tmp_path / "imatrix.gguf")
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert "general.architecture" not in fields
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["calib.txt", "more.jsonl"]
    for key, value in (("imatrix.chunk_count", 3), ("imatrix.chunk_size", 20)):
        assert fields[key].types == [gguf.GGUFValueType.UINT32] and fields[key].contents() == value
    names = [t.name for t in reader.tensors]
    expected = []
    for name in sorted(matrix.entries):
        expected += [f"{name}.in_sum2", f"{name}.counts"]
    assert names == expected
    for tensor in reader.tensors:
        entry = matrix.entries[tensor.name.rsplit(".", 1)[0]]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        experts, features = entry.sums.shape
        if tensor.name.endswith(".in_sum2"):  # ggml order: [features, experts]
            assert list(tensor.shape) == [features, experts]
            np.testing.assert_array_equal(np.asarray(tensor.data).reshape(experts, features), entry.sums.numpy())
        else:
            assert list(tensor.shape) == [1, experts]
            np.testing.assert_array_equal(np.asarray(tensor.data).reshape(-1), entry.counts.numpy())


def test_gguf_round_trip(tmp_path):
    matrix = _matrix()
    back = read_imatrix(write_imatrix(matrix, tmp_path / "m.gguf"))
    assert (back.datasets, back.chunk_count, back.chunk_size) == (matrix.datasets, 3, 20)
    assert set(back.entries) == set(matrix.entries)
    for name, entry in matrix.entries.items():
        assert torch.equal(back.entries[name].sums, entry.sums) and torch.equal(back.entries[name].counts, entry.counts)


def test_a_matrix_without_dataset_names_still_has_every_key(tmp_path):
    matrix = _matrix()
    matrix.datasets = []
    fields = gguf.GGUFReader(write_imatrix(matrix, tmp_path / "m.gguf")).fields
    assert fields["imatrix.datasets"].contents() == ["(unnamed)"]  # llama-quantize needs the key
    assert read_imatrix(tmp_path / "m.gguf").chunk_count == 3


def test_output_is_refused_when_it_exists_and_replaced_with_overwrite(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"keep me")
    with pytest.raises(LowbitError, match="already exists"):
        write_imatrix(_matrix(), path)
    assert path.read_bytes() == b"keep me"
    write_imatrix(_matrix(), path, overwrite=True)
    assert read_imatrix(path).chunk_count == 3
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary left


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError):
        write_imatrix(_matrix(), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def legacy_bytes(matrix: ImportanceMatrix, trailer: bool = True) -> bytes:
    """A reference writer of llama.cpp's legacy format (``save_imatrix_legacy``): values
    ``(sum / count) * ncall`` with ``ncall = ceil(max count / chunk_size)``."""
    parts = [struct.pack("<i", len(matrix.entries))]
    for name in sorted(matrix.entries):
        entry = matrix.entries[name]
        ncall = (int(entry.counts.max()) + matrix.chunk_size - 1) // matrix.chunk_size
        values = [float(s) / float(entry.counts[0]) * ncall for s in entry.sums.reshape(-1)]
        parts += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", ncall, len(values)), struct.pack(f"<{len(values)}f", *values)]
    if trailer:
        dataset = matrix.datasets[-1].encode()
        parts += [struct.pack("<ii", matrix.chunk_count, len(dataset)), dataset]
    return b"".join(parts)


@pytest.mark.parametrize("trailer", [True, False])
def test_legacy_dat_is_read_as_llama_cpp_reads_it(tmp_path, trailer):
    matrix = _matrix()
    del matrix.entries["blk.0.ffn_up_exps.weight"]  # the legacy writer stores dense entries here
    path = tmp_path / "imatrix.dat"
    path.write_bytes(legacy_bytes(matrix, trailer))
    back = read_imatrix(path)
    assert set(back.entries) == set(matrix.entries)
    assert back.entries["blk.1.attn_q.weight"].counts.tolist() == [3.0]  # ncall: 60 tokens in chunks of 20
    for name in matrix.entries:
        torch.testing.assert_close(back.importance(name), matrix.importance(name), rtol=1e-6, atol=0)
    assert (back.chunk_count, back.datasets) == ((3, ["more.jsonl"]) if trailer else (0, []))


@pytest.mark.parametrize(
    "cut, problem",
    [(2, "ends early"), (33, "ends early"), (-9, "a length of 384 bytes runs past its end")],
    ids=["count", "counts", "values"],
)
def test_truncated_legacy_files_are_clear_errors(tmp_path, cut, problem):
    matrix = _matrix()
    del matrix.entries["blk.0.ffn_up_exps.weight"]
    data = legacy_bytes(matrix, trailer=False)
    path = tmp_path / "cut.dat"
    path.write_bytes(data[:cut])
    with pytest.raises(LowbitError, match=problem):
        read_imatrix(path)


def test_not_an_imatrix(tmp_path):
    path = tmp_path / "x.dat"
    path.write_bytes(struct.pack("<i", 1_000_000) + b"\0" * 20)
    with pytest.raises(LowbitError, match="claims 1000000 entries"):
        read_imatrix(path)
    path.write_bytes(struct.pack("<ii", 1, 10_000) + b"blk.0" + b"\0" * 20)
    with pytest.raises(LowbitError, match="a length of 10000 bytes runs past its end"):
        read_imatrix(path)
    with pytest.raises(LowbitError, match="no such importance matrix file"):
        read_imatrix(tmp_path / "missing.gguf")


def _gguf(path: Path, keys: bool = True, tensors: dict | None = None) -> Path:
    writer = gguf.GGUFWriter(path, arch="llama")
    if keys:
        writer.add_array("imatrix.datasets", ["a"])
        writer.add_uint32("imatrix.chunk_count", 1)
        writer.add_uint32("imatrix.chunk_size", 4)
    for name, value in (tensors or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "keys, tensors, problem",
    [
        (False, {"a.in_sum2": np.ones((1, 4), np.float32), "a.counts": np.ones((1, 1), np.float32)}, "lacks the key"),
        (True, {"a.in_sum2": np.ones((1, 4), np.float32)}, "sums without counts"),
        (True, {"a.in_sum2": np.ones((1, 4), np.float16), "a.counts": np.ones((1, 1), np.float32)}, "must be F32"),
        (True, {"a.in_sum2": np.ones((1, 5), np.float32), "a.counts": np.ones((2, 1), np.float32)}, "not a multiple"),
        (True, {"token_embd.weight": np.ones((2, 4), np.float32)}, "holds no .in_sum2"),
    ],
    ids=["no-keys", "no-counts", "f16", "ragged", "a-model"],
)
def test_bad_gguf_imatrix_files(tmp_path, keys, tensors, problem):
    with pytest.raises(LowbitError, match=problem):
        read_imatrix(_gguf(tmp_path / "bad.gguf", keys, tensors))


def test_truncated_gguf_imatrix(tmp_path):
    path = write_imatrix(_matrix(), tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LowbitError, match="not a valid GGUF file"):
        read_imatrix(path)


# -- statistics of a model ------------------------------------------------------------------------


def _reference_importance(model, tokens) -> dict[str, torch.Tensor]:
    """Sum of x² per input channel of every decoder linear, the whole model run at once, float64."""
    sums, handles = {}, []
    for name, module in model.named_modules():
        if is_linear(module) and ".layers." in name:
            def hook(_m, inputs, _o, name=name):
                x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.square().sum(0)
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for handle in handles:
        handle.remove()
    return sums


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_linear_of_every_family_matches_the_whole_model_reference(arch):
    model = tiny_model(arch)
    tokens = tiny_tokens(3, 20)
    reference = _reference_importance(model, tokens)
    matrix = collect_importance(model, tokens, dataset="t.txt", progress=False, batch_size=2)
    names = tensor_names(model.config.model_type, model.config.num_hidden_layers)
    assert set(matrix.entries) == {names[name] for name in reference}  # every linear, named as llama.cpp does
    for name, sums in reference.items():
        entry = matrix.entries[names[name]]
        assert entry.counts.tolist() == [60.0]
        torch.testing.assert_close(entry.sums[0].double(), sums, rtol=1e-5, atol=1e-6)
    assert (matrix.chunk_count, matrix.chunk_size, matrix.datasets) == (3, 20, ["t.txt"])
    assert all(p.device.type != "meta" for p in model.parameters())  # a model in memory is left whole


def test_llama_names_and_shared_inputs():
    matrix = collect_importance(tiny_model("llama"), tiny_tokens(2, 16), progress=False)
    assert sorted(matrix.entries)[:7] == [
        "blk.0.attn_k.weight", "blk.0.attn_output.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight",
        "blk.0.ffn_down.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight",
    ]  # fmt: skip
    q, k = matrix.entries["blk.1.attn_q.weight"], matrix.entries["blk.1.attn_k.weight"]
    assert torch.equal(q.sums, k.sums)  # q and k read the same input
    assert matrix.entries["blk.1.ffn_down.weight"].features == 200
    assert "output.weight" not in matrix.entries  # as llama-imatrix without --process-output


# -- the API and the command ----------------------------------------------------------------------


def test_api_streams_from_disk_and_takes_llama_imatrix_chunks(tiny_model_dir, eval_text_file, byte_tokenizer, tmp_path):
    out = tmp_path / "im.gguf"
    matrix = lowbit.imatrix(tiny_model_dir, eval_text_file, out, calibration_samples=4, calibration_length=32, progress=False)
    assert out.is_file() and read_imatrix(out).chunk_count == 4
    assert matrix.datasets == [str(eval_text_file)]
    ids = byte_tokenizer(eval_text_file.read_text(), add_special_tokens=False)["input_ids"]
    chunks = torch.tensor(ids[: 4 * 32]).reshape(4, 32)  # consecutive windows from the start
    expected = lowbit.imatrix(tiny_model(), chunks, progress=False)
    for name, entry in expected.entries.items():
        torch.testing.assert_close(matrix.entries[name].sums, entry.sums, rtol=1e-5, atol=1e-6)


def test_chunks_start_with_bos_when_asked(byte_tokenizer, eval_text_file):
    from lowbit.api import imatrix_chunks

    byte_tokenizer.bos_token = byte_tokenizer.convert_ids_to_tokens(7)
    plain = imatrix_chunks(byte_tokenizer, eval_text_file, 3, 16, bos=False)
    with_bos = imatrix_chunks(byte_tokenizer, eval_text_file, 3, 16, bos=True)
    assert (with_bos[:, 0] == 7).all() and torch.equal(with_bos[:, 1:], plain[:, 1:])  # replaced, as llama-imatrix does
    assert torch.equal(plain.reshape(-1), torch.tensor(byte_tokenizer(eval_text_file.read_text())["input_ids"][:48]))


def test_api_refuses_before_any_work(tiny_model_dir, eval_text_file, tmp_path):
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"x")
    with pytest.raises(LowbitError, match="already exists"):
        lowbit.imatrix("no/such/model", eval_text_file, existing)
    with pytest.raises(LowbitError, match=r"has [\d,]+ tokens, shorter than 100 samples of 512 tokens \(51,200 needed\)"):
        lowbit.imatrix(tiny_model_dir, eval_text_file, tmp_path / "m.gguf", calibration_samples=100)
    assert not (tmp_path / "m.gguf").exists()


def test_cli(tiny_model_dir, eval_text_file, tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "cli.gguf"
    args = ["imatrix", str(tiny_model_dir), "--calibration", str(eval_text_file), "--calibration-samples", "2",
            "--calibration-length", "24", "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "importance of 14 tensors over 2 chunks of 24 tokens" in capsys.readouterr().out
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--calibration-samples", "999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the calibration text has") and "23,976 needed" in err


# -- heavy: llama.cpp itself ----------------------------------------------------------------------


def _llama_tools() -> Path:
    cache = Path(os.environ.get("LOWBIT_TOOLS", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowbit" / "tools"))
    tools = cache / "llama.cpp-0.3.36" / "bin"
    if not (tools / "llama-imatrix").is_file():
        pytest.skip(f"llama.cpp's tools are not built ({tools}): run bash scripts/llama_cpp_tools.sh")
    return tools


@pytest.fixture(scope="module")
def smollm_imatrices(tmp_path_factory):
    """SmolLM2's importance matrix from lowbit and from llama-imatrix, on the same 8 chunks of
    512 tokens of the calibration file (a few minutes on 2 cores)."""
    tools = _llama_tools()
    calib = SHARED_DATA / "wikitext2-valid-calib.txt"
    if not calib.is_file():
        pytest.skip(f"the calibration text {calib} is not there")
    from lowbit.sources import default_model_path

    work = tmp_path_factory.mktemp("imatrix")
    f32 = work / "smollm2-f32.gguf"
    subprocess.run([tools / "llama-quantize", "--allow-requantize", default_model_path(), f32, "F32"], check=True, capture_output=True)
    theirs = work / "llama.gguf"
    subprocess.run(
        [tools / "llama-imatrix", "-m", f32, "-f", calib, "-o", theirs, "--chunks", "8", "-c", "512", "--no-ppl", "-t", "2"],
        check=True, capture_output=True,
    )  # fmt: skip
    ours = work / "lowbit.gguf"
    lowbit.imatrix("smollm2-135m", calib, ours, calibration_samples=8, calibration_length=512, progress=False)
    return tools, f32, ours, theirs


@pytest.mark.heavy
def test_llama_quantize_accepts_ours(smollm_imatrices):
    tools, f32, ours, _ = smollm_imatrices
    result = subprocess.run(
        [tools / "llama-quantize", "--imatrix", ours, f32, f32.with_name("q4_k_m.gguf"), "Q4_K_M", "2"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded 210 importance matrix entries" in result.stdout + result.stderr


@pytest.mark.heavy
def test_ours_matches_llama_imatrix(smollm_imatrices):
    """Measured: every one of the 210 tensors correlates above 0.99999997 with llama-imatrix's,
    relative difference at most 2e-4 (float32 sums in another order)."""
    _, _, ours, theirs = smollm_imatrices
    a, b = read_imatrix(ours), read_imatrix(theirs)
    assert set(a.entries) == set(b.entries) and len(a.entries) == 210
    assert (a.chunk_count, a.chunk_size) == (b.chunk_count, b.chunk_size) == (8, 512)
    for name in a.entries:
        assert torch.equal(a.entries[name].counts, b.entries[name].counts), name
        x, y = a.importance(name).double(), b.importance(name).double()
        assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.99999, name
        assert (x - y).norm() / y.norm() < 1e-3, name


# -- weighted RTN: --imatrix --------------------------------------------------------------------------


def test_rtn_clip_search_is_weighted_by_the_imatrix(tmp_path):
    from lowbit.algorithms.rtn import RTNConfig, quantize_rtn
    from lowbit.formats import get_format
    from lowbit.nn import QuantLinear

    reference = tiny_model("qwen2")
    matrix = collect_importance(tiny_model("qwen2"), tiny_tokens(3, 20), progress=False)
    path = write_imatrix(matrix, tmp_path / "m.gguf")
    model = lowbit.quantize(tiny_model("qwen2"), "int4-g32+clip", imatrix=path, progress=False)
    names = tensor_names("qwen2", 2)
    fmt, config = get_format("int4-g32"), RTNConfig(clip_search=True)
    weighted_differs = 0
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear) or name == "lm_head":
            continue
        weight = reference.get_submodule(name).weight.data
        expected = quantize_rtn(weight, fmt, config, read_imatrix(path).importance(names[name]))
        assert torch.equal(module.dequantize_weight(torch.float32), expected.dequantize()), name
        weighted_differs += not torch.equal(expected.dequantize(), quantize_rtn(weight, fmt, config).dequantize())
    assert weighted_differs > 0  # the importance changed some choice
    assert model.lowbit_manifest["calibration"] is None  # no calibration text was drawn


def test_imatrix_of_another_model_or_an_unused_one(tmp_path):
    path = write_imatrix(collect_importance(tiny_model("llama", hidden_size=64, head_dim=16), tiny_tokens(2, 16), progress=False), tmp_path / "other.gguf")
    with pytest.raises(LowbitError, match="has importance for 64 input columns.*made for another model"):
        lowbit.quantize(tiny_model("llama"), "int4-g32+clip", imatrix=path, progress=False)
    with pytest.warns(UserWarning, match="has none, so .* is not used"):
        lowbit.quantize(tiny_model("llama", hidden_size=64, head_dim=16), "int4-g32", imatrix=path, progress=False)


def test_cli_quantize_with_imatrix(tiny_model_dir, eval_text_file, tmp_path, capsys):
    from lowbit.cli import main

    imatrix = tmp_path / "m.gguf"
    lowbit.imatrix(tiny_model_dir, eval_text_file, imatrix, calibration_samples=2, calibration_length=24, progress=False)
    assert main(["quantize", str(tiny_model_dir), "-s", "int4-g32+clip", "--imatrix", str(imatrix), "-o", str(tmp_path / "out")]) == 0
    assert main(["quantize", str(tiny_model_dir), "-s", "int4-g32+clip", "--imatrix", str(tmp_path / "no.gguf"), "-o", str(tmp_path / "o2")]) == 2
    assert "no such importance matrix file" in capsys.readouterr().err
