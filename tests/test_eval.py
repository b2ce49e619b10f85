"""Evaluation (``lowbit/eval``): perplexity, KL divergence and top-1 agreement against a
reference written out here in float64 (log-softmax by hand, NLL by gather, KL as
sum p (log p - log q), argmax agreement); weight bytes and bits per weight against sizes
computed by hand from each linear's shape."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny_models import tiny_model, tiny_tokens
from torch import nn

import lowbit
from lowbit.eval import (
    ReferenceLogProbs,
    bits_per_weight,
    evaluate_windows,
    reference_log_probs,
    weight_bytes,
)
from lowbit.eval.memory import linear_weight_stats
from lowbit.formats import get_format
from lowbit.plan import Plan, make_rule

EVALUATE_KEYS = {
    "perplexity",
    "kl_divergence",
    "top1_agreement",
    "weight_bytes",
    "bits_per_weight",
    "tokens_per_second",
    "windows",
    "window_length",
}


def log_softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()
    shifted = x - x.max(-1, keepdim=True).values
    return shifted - shifted.exp().sum(-1, keepdim=True).log()


def reference_metrics(model: nn.Module, windows: torch.Tensor, reference: nn.Module | None) -> dict:
    with torch.no_grad():
        q = log_softmax_by_hand(model(windows).logits)
        p = None if reference is None else log_softmax_by_hand(reference(windows).logits)
    targets = windows[:, 1:]
    nll = -q[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    result = {"perplexity": math.exp(nll.mean().item())}
    if p is not None:
        kl = (p.exp() * (p - q)).sum(-1)  # KL(reference || model) at every position
        result["kl_divergence"] = kl.mean().item()
        result["top1_agreement"] = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    return result


@pytest.fixture(scope="module")
def models():
    reference = tiny_model("llama")
    quantized = lowbit.quantize(copy.deepcopy(reference), "int4-g32", progress=False)
    return reference, quantized


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_evaluate_windows_matches_reference(models, batch_size):
    reference, quantized = models
    windows = tiny_tokens(5, 20, seed=7)
    result = evaluate_windows(quantized, windows, reference, batch_size=batch_size, progress=False)
    expected = reference_metrics(quantized, windows, reference)
    assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert result["kl_divergence"] == pytest.approx(expected["kl_divergence"], rel=1e-4, abs=1e-7)
    assert result["top1_agreement"] == pytest.approx(expected["top1_agreement"], abs=1e-12)
    assert result["windows"] == 5 and result["window_length"] == 20
    assert result["tokens_per_second"] > 0
    # int4 is measurably different from the reference, and not wildly so
    assert 0 < result["kl_divergence"] < 1
    assert 0.3 < result["top1_agreement"] < 1


def test_evaluate_windows_without_reference(models):
    _, quantized = models
    windows = tiny_tokens(3, 17, seed=2)
    result = evaluate_windows(quantized, windows, None, progress=False)
    assert result["perplexity"] == pytest.approx(reference_metrics(quantized, windows, None)["perplexity"], rel=1e-5)
    assert result["kl_divergence"] is None and result["top1_agreement"] is None


def test_model_against_itself(models):
    reference, _ = models
    windows = tiny_tokens(3, 16, seed=3)
    result = evaluate_windows(reference, windows, reference, batch_size=2, progress=False)
    assert result["kl_divergence"] == 0.0
    assert result["top1_agreement"] == 1.0
    assert result["perplexity"] == evaluate_windows(reference, windows, None, batch_size=2, progress=False)["perplexity"]
    # a random model on random tokens: perplexity near the vocabulary size, not near 1
    assert 100 < result["perplexity"] < 1000


@pytest.mark.parametrize("batch_size", [1, 2])
def test_cached_reference_gives_the_same_numbers(models, batch_size):
    reference, quantized = models
    windows = tiny_tokens(4, 12, seed=5)
    cache = reference_log_probs(reference, windows, batch_size, progress=False)
    assert isinstance(cache, ReferenceLogProbs)
    assert len(cache.batches) == math.ceil(4 / batch_size)
    # the summary, against sums written out in float64
    p = log_softmax_by_hand(reference(windows).logits)
    summary = {key: torch.cat([getattr(b, key) for b in cache.batches]) for key in ("top1", "neg_entropy", "expected_row")}
    assert torch.equal(summary["top1"], p.argmax(-1))
    assert torch.allclose(summary["neg_entropy"], (p.exp() * p).sum(-1), rtol=1e-6)
    assert torch.allclose(summary["expected_row"].double(), p.exp() @ reference.lm_head.weight.double(), atol=1e-6)
    assert cache.nbytes == windows.numel() * (8 + 8 + 4 * reference.config.hidden_size)  # no bias in llama's lm_head
    cached = evaluate_windows(quantized, windows, cache, batch_size, progress=False)
    direct = evaluate_windows(quantized, windows, reference, batch_size, progress=False)
    for key in ("perplexity", "top1_agreement", "windows", "window_length"):
        assert cached[key] == direct[key], key
    # the same KL by another route (from the output layer's input, not from the float32 logits):
    # equal to their rounding (here 5e-6 relative, 2e-8 absolute)
    assert cached["kl_divergence"] == pytest.approx(direct["kl_divergence"], rel=2e-5)
    assert cached["kl_divergence"] == pytest.approx(reference_metrics(quantized, windows, reference)["kl_divergence"], rel=2e-5)


def test_cached_reference_with_an_output_bias(monkeypatch):
    """An lm_head with a bias: the summary carries sum_v p_v b_v, and still gives the KL."""
    reference = tiny_model("llama", tie_word_embeddings=False)
    reference.lm_head = nn.Linear(96, 256, bias=True)
    with torch.no_grad():
        reference.lm_head.weight.normal_(0, 0.05)
        reference.lm_head.bias.normal_(0, 0.5)
    quantized = lowbit.quantize(copy.deepcopy(reference), "int4-g32", keep_dtype="fp32", progress=False)  # the same head
    windows = tiny_tokens(3, 12, seed=6)
    cache = reference_log_probs(reference, windows, 1, progress=False)
    p = log_softmax_by_hand(reference(windows).logits)
    bias = torch.cat([b.expected_bias for b in cache.batches])
    assert torch.allclose(bias, p.exp() @ reference.lm_head.bias.double(), atol=1e-9)
    assert cache.nbytes == windows.numel() * (8 + 8 + 8 + 4 * 96)
    used = []
    from lowbit.eval import quality

    real = quality._kl_from_summary
    monkeypatch.setattr(quality, "_kl_from_summary", lambda *a: used.append(1) or real(*a))
    cached = evaluate_windows(quantized, windows, cache, 1, progress=False)
    assert used  # the summary held
    expected = reference_metrics(quantized, windows, reference)["kl_divergence"]
    assert cached["kl_divergence"] == pytest.approx(expected, rel=2e-5)


def test_cached_reference_refuses_other_windows(models):
    reference, quantized = models
    windows = tiny_tokens(4, 12, seed=5)
    cache = reference_log_probs(reference, windows, 2, progress=False)
    with pytest.raises(ValueError, match="other windows or batches"):
        evaluate_windows(quantized, tiny_tokens(4, 12, seed=6), cache, 2, progress=False)
    with pytest.raises(ValueError, match="other windows or batches"):
        evaluate_windows(quantized, windows, cache, 1, progress=False)


def forbid_summary(monkeypatch):
    from lowbit.eval import quality

    monkeypatch.setattr(quality, "_kl_from_summary", lambda *a: pytest.fail("used the summary where it does not hold"))


@pytest.mark.parametrize("case", ["quantized-lm-head", "soft-capping", "other-head"])
def test_cached_reference_runs_the_reference_where_the_summary_does_not_hold(case, monkeypatch):
    """A quantized lm_head, logits changed after the output layer (Gemma 2's soft-capping) or
    other output weights: the reference model runs again, and the numbers are the direct ones."""
    arch = "gemma2" if case == "soft-capping" else "qwen2"  # qwen2: untied, so lm_head alone can be quantized
    reference = tiny_model(arch)
    if case == "quantized-lm-head":
        quantized = lowbit.quantize(copy.deepcopy(reference), Plan([make_rule("*", "int4-g32")]), progress=False)
    elif case == "other-head":
        quantized = copy.deepcopy(reference)
        quantized.lm_head.weight.data[0, 0] += 1e-3
    else:
        quantized = lowbit.quantize(copy.deepcopy(reference), "int4-g32", progress=False)
    windows = tiny_tokens(3, 12, seed=8)
    cache = reference_log_probs(reference, windows, 1, progress=False)
    forbid_summary(monkeypatch)
    cached = evaluate_windows(quantized, windows, cache, 1, progress=False)
    direct = evaluate_windows(quantized, windows, reference, 1, progress=False)
    for key in ("perplexity", "kl_divergence", "top1_agreement"):
        assert cached[key] == direct[key], key
    assert cached["kl_divergence"] > 0


def test_cached_reference_of_itself_is_exactly_zero(models, monkeypatch):
    reference, _ = models
    windows = tiny_tokens(3, 16, seed=4)
    cache = reference_log_probs(reference, windows, 1, progress=False)
    forbid_summary(monkeypatch)
    result = evaluate_windows(reference, windows, cache, 1, progress=False)
    assert result["kl_divergence"] == 0.0 and result["top1_agreement"] == 1.0
    assert result["perplexity"] == evaluate_windows(reference, windows, None, 1, progress=False)["perplexity"]


# -- memory --------------------------------------------------------------------------------


def test_weight_bytes_counts_tied_tensors_once():
    tied = tiny_model("llama")
    untied = tiny_model("llama", tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    vocab, hidden = tied.get_input_embeddings().weight.shape
    by_hand = sum(p.numel() * 4 for p in untied.parameters())
    assert weight_bytes(untied) == by_hand
    assert weight_bytes(tied) == by_hand - vocab * hidden * 4
    assert weight_bytes(tied) == sum(p.numel() * p.element_size() for p in tied.parameters())  # parameters() dedups


def test_weight_bytes_and_bits_of_a_quantized_model():
    model = tiny_model("qwen2")  # untied, with biases
    assert bits_per_weight(model) == 32.0
    shapes = {name: tuple(m.weight.shape) for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}
    dense_total = weight_bytes(model)
    lowbit.quantize(model, "int4-g32", progress=False)

    def int4_g32_bytes(out_features, in_features):
        """Asymmetric int4 in groups of 32: 4-bit codes, a float16 scale and a 4-bit zero per group."""
        groups = math.ceil(in_features / 32)
        return out_features * (math.ceil(in_features / 2) + 2 * groups + math.ceil(groups / 2))

    packed = sum(int4_g32_bytes(*s) for s in shapes.values())
    assert packed == sum(get_format("int4-g32").storage_bytes(s) for s in shapes.values())
    weights = sum(o * i for o, i in shapes.values())
    assert linear_weight_stats(model) == (packed, weights)
    assert bits_per_weight(model) == 8 * packed / weights
    # 96 and 200 input features: 3 and 7 groups (the last partial), so more than 4.5 bits
    assert 4.6 < bits_per_weight(model) < 4.8
    assert weight_bytes(model) == (dense_total - 4 * weights) // 2 + packed  # kept tensors (all float32) stored in float16


# -- the API ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "tiny-int4"
    lowbit.save(lowbit.quantize(lowbit.load(tiny_model_dir), "int4-g32", progress=False), out)
    return out


def test_evaluate_paths_against_reference(native_dir, tiny_model_dir, eval_text_file, byte_tokenizer):
    result = lowbit.evaluate(
        native_dir, reference=tiny_model_dir, data=eval_text_file, windows=3, window_length=32, progress=False
    )
    assert EVALUATE_KEYS <= set(result)
    json.loads(json.dumps(result))  # JSON-serialisable as it is
    assert result["windows"] == 3 and result["window_length"] == 32
    assert result["data"] == str(eval_text_file) and result["bos"] is False
    # the same numbers from our own reference on the first 3 windows of the text's tokens
    ids = byte_tokenizer(eval_text_file.read_text(), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: 3 * 32]).reshape(3, 32)
    quantized, reference = lowbit.load(native_dir), lowbit.load(tiny_model_dir)
    expected = reference_metrics(quantized, windows, reference)
    assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert result["kl_divergence"] == pytest.approx(expected["kl_divergence"], rel=1e-4, abs=1e-7)
    assert result["top1_agreement"] == pytest.approx(expected["top1_agreement"], abs=1e-12)
    assert result["weight_bytes"] == weight_bytes(quantized)
    assert result["bits_per_weight"] == bits_per_weight(quantized)
    assert result["dtype"] == "float32" and result["device"] == "cpu"


def test_evaluate_default_windows_and_too_few(tiny_model_dir, eval_text_file, byte_tokenizer):
    tokens = len(byte_tokenizer(eval_text_file.read_text(), add_special_tokens=False)["input_ids"])
    result = lowbit.evaluate(tiny_model_dir, data=eval_text_file, window_length=64, progress=False)
    assert result["windows"] == min(40, tokens // 64)
    assert result["kl_divergence"] is None
    with pytest.warns(UserWarning, match=f"holds {tokens // 64} windows of 64 tokens"):
        result = lowbit.evaluate(tiny_model_dir, data=eval_text_file, windows=1000, window_length=64, progress=False)
    assert result["windows"] == tokens // 64


def test_evaluate_text_shorter_than_a_window(tiny_model_dir, tmp_path):
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(lowbit.LowbitError, match="has 9 tokens, shorter than one window of 32"):
        lowbit.evaluate(tiny_model_dir, data=tmp_path / "short.txt", window_length=32, progress=False)


def test_evaluate_needs_a_tokenizer(tiny_model_dir, eval_text_file):
    model = tiny_model("llama")  # a module without a tokenizer
    with pytest.raises(lowbit.LowbitError, match="no tokenizer"):
        lowbit.evaluate(model, data=eval_text_file, window_length=16, progress=False)


def test_compare_refuses_a_quantized_model(native_dir):
    with pytest.raises(lowbit.LowbitError, match="needs an unquantized model"):
        lowbit.compare(native_dir, ["int8"], progress=False)


def test_compare_refuses_a_bad_scheme_before_loading(monkeypatch):
    from lowbit import api

    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded a model for a bad scheme"))
    with pytest.raises(lowbit.LowbitError, match="unknown scheme 'int4-g12x'"):
        lowbit.compare("anything", ["int8", "int4-g12x"])


def test_compare_holds_one_float_model(tiny_model_dir, eval_text_file, monkeypatch):
    """Each scheme quantizes a copy that shares the float model's tensors: the base is loaded
    once and left unchanged, and a candidate's own tensors are its quantized parts only."""
    from lowbit import api
    from lowbit.nn import QuantLinear, unique_state_dict

    loads, candidates = [], []
    real_load, real_quantize = api.load_model, api.quantize_model

    def counting_load(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        loads.append(loaded[0])
        return loaded

    def keeping_quantize(model, plan, **kwargs):
        candidates.append(model)
        return real_quantize(model, plan, **kwargs)

    monkeypatch.setattr(api, "load_model", counting_load)
    monkeypatch.setattr(api, "quantize_model", keeping_quantize)
    result = lowbit.compare(tiny_model_dir, ["int8", "int4-g32"], data=eval_text_file, windows=2, window_length=32, progress=False)
    assert len(loads) == 1 and len(candidates) == 2
    base = loads[0]
    expected = lowbit.load(tiny_model_dir).state_dict()
    assert base.state_dict().keys() == expected.keys()
    assert all(torch.equal(base.state_dict()[k], expected[k]) for k in expected)  # the base is untouched
    assert not any(isinstance(m, QuantLinear) for m in base.modules())
    base_storage = {t.untyped_storage().data_ptr() for t in base.state_dict().values()}
    for candidate, row in zip(candidates, result["rows"][1:]):
        own = [t for t in unique_state_dict(candidate).values() if t.untyped_storage().data_ptr() not in base_storage]
        packed, _ = linear_weight_stats(candidate)
        assert sum(t.numel() * t.element_size() for t in own) == packed  # nothing float was copied
        assert row["weight_bytes"] == weight_bytes(candidate)
        # its own Parameter objects over the same memory (moving its layers never moves the base's), ties kept
        embedding, base_embedding = candidate.get_input_embeddings().weight, base.get_input_embeddings().weight
        assert embedding is not base_embedding and embedding.data_ptr() == base_embedding.data_ptr()
        assert candidate.lm_head.weight is embedding
    assert result["rows"][0]["kl_divergence"] == 0.0 and result["rows"][0]["top1_agreement"] == 1.0


def test_evaluate_on_a_device(native_dir, eval_text_file, monkeypatch):
    on_cpu = lowbit.evaluate(native_dir, data=eval_text_file, windows=2, window_length=32, device="cpu", progress=False)
    assert on_cpu["device"] == "cpu"
    assert on_cpu["perplexity"] == lowbit.evaluate(native_dir, data=eval_text_file, windows=2, window_length=32, progress=False)["perplexity"]
    from lowbit import api

    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded a model for a device that does not exist"))
    with pytest.raises(lowbit.LowbitError, match="unknown device 'tpu'"):
        lowbit.evaluate("anything", device="tpu")


# -- uncertainty, BOS, text checked first ---------------------------------------------------------


def test_standard_errors_across_windows(models):
    """Each number's standard error is that of the windows' own means, computed by hand."""
    reference, quantized = models
    windows = tiny_tokens(5, 20)
    result = evaluate_windows(quantized, windows, reference, batch_size=2, progress=False)
    per_window = [reference_metrics(quantized, windows[i : i + 1], reference) for i in range(5)]

    def mean_se(values):
        values = torch.tensor(values, dtype=torch.float64)
        return values.mean().item(), (values.std() / math.sqrt(len(values))).item()

    log_ppl, log_ppl_se = mean_se([math.log(m["perplexity"]) for m in per_window])
    _, kl_se = mean_se([m["kl_divergence"] for m in per_window])
    top1, top1_se = mean_se([m["top1_agreement"] for m in per_window])
    assert math.log(result["perplexity"]) == pytest.approx(log_ppl, rel=1e-6)
    assert result["log_perplexity_se"] == pytest.approx(log_ppl_se, rel=1e-4)
    assert result["kl_divergence_se"] == pytest.approx(kl_se, rel=1e-3, abs=1e-8)
    assert result["top1_agreement"] == pytest.approx(top1, abs=1e-12)
    assert result["top1_agreement_se"] == pytest.approx(top1_se, abs=1e-12)
    assert kl_se > 0 and top1_se > 0
    one = evaluate_windows(quantized, windows[:1], reference, progress=False)
    assert one["kl_divergence_se"] is None and one["log_perplexity_se"] is None  # no spread from one window
    cached = evaluate_windows(quantized, windows, reference_log_probs(reference, windows, 2, False), 2, False)
    assert cached["kl_divergence_se"] == pytest.approx(result["kl_divergence_se"], rel=1e-4)


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The byte tokenizer, but one that puts id 1 (BOS) first, as Llama's and Gemma's do."""
    from conftest import make_byte_tokenizer
    from tokenizers.processors import TemplateProcessing

    tokenizer = make_byte_tokenizer()
    bos = tokenizer.convert_ids_to_tokens(1)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 1)])
    tokenizer.bos_token = bos
    assert tokenizer("ab")["input_ids"][0] == 1
    return tokenizer


def test_expects_bos(bos_tokenizer, byte_tokenizer):
    from lowbit.api import expects_bos

    assert expects_bos(bos_tokenizer) is True
    assert expects_bos(byte_tokenizer) is False  # no BOS token at all


def test_windows_start_with_bos_when_the_tokenizer_adds_one(bos_tokenizer, byte_tokenizer, eval_text_file):
    from lowbit.api import evaluation_windows

    text = torch.tensor(byte_tokenizer(eval_text_file.read_text(), add_special_tokens=False)["input_ids"])
    with_bos = evaluation_windows(bos_tokenizer, eval_text_file, 3, 16)
    assert with_bos.shape == (3, 16)
    assert (with_bos[:, 0] == 1).all()
    assert torch.equal(with_bos[:, 1:], text[: 3 * 15].reshape(3, 15))  # 15 tokens of text after BOS
    without = evaluation_windows(bos_tokenizer, eval_text_file, 3, 16, bos=False)
    assert torch.equal(without, text[: 3 * 16].reshape(3, 16))
    assert torch.equal(evaluation_windows(byte_tokenizer, eval_text_file, 3, 16), without)
    with pytest.raises(lowbit.LowbitError, match="no BOS token"):
        evaluation_windows(byte_tokenizer, eval_text_file, 3, 16, bos=True)


def test_evaluate_follows_the_tokenizer_and_says_so(tiny_model_dir, eval_text_file, bos_tokenizer, tmp_path):
    import shutil

    directory = tmp_path / "with-bos"
    shutil.copytree(tiny_model_dir, directory)
    bos_tokenizer.save_pretrained(directory)
    result = lowbit.evaluate(directory, data=eval_text_file, windows=2, window_length=16, progress=False)
    assert result["bos"] is True
    windows = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.tensor(
        bos_tokenizer(eval_text_file.read_text(), add_special_tokens=False)["input_ids"][:30]).reshape(2, 15)], dim=1)
    expected = reference_metrics(lowbit.load(directory), windows, None)
    assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    overridden = lowbit.evaluate(directory, data=eval_text_file, windows=2, window_length=16, bos=False, progress=False)
    assert overridden["bos"] is False and overridden["perplexity"] != result["perplexity"]


def test_text_is_checked_before_any_model_is_loaded(tiny_model_dir, tmp_path, monkeypatch):
    from lowbit import api

    (tmp_path / "short.txt").write_text("too short")
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded a model for a text too short"))
    for call in (
        lambda: lowbit.evaluate(tiny_model_dir, data=tmp_path / "short.txt", window_length=32, progress=False),
        lambda: lowbit.compare(tiny_model_dir, ["int8"], data=tmp_path / "short.txt", window_length=32, progress=False),
        lambda: lowbit.recipe(tiny_model_dir, data=tmp_path / "short.txt", window_length=32, progress=False),
    ):
        with pytest.raises(lowbit.LowbitError, match="has 9 tokens, shorter than one window of 32"):
            call()


def test_smollm2_gets_no_bos():
    """The dev protocol's numbers for SmolLM2 are measured without BOS: its tokenizer adds none."""
    from lowbit.api import _tokenizer_first, expects_bos

    try:
        tokenizer = _tokenizer_first("smollm2-135m")
    except lowbit.LowbitError as error:
        pytest.skip(str(error))
    assert tokenizer.bos_token_id is not None and expects_bos(tokenizer) is False


def test_compare_sorts_explains_and_answers(tiny_model_dir, eval_text_file, capsys):
    result = lowbit.compare(
        tiny_model_dir, ["int4-g32", "int8", "int3-g128"], data=eval_text_file, windows=4, window_length=16
    )
    err = capsys.readouterr().err
    assert "[1/3] int4-g32" in err and "[3/3] int3-g128" in err  # progress across schemes
    sizes = [row["weight_bytes"] for row in result["rows"]]
    assert sizes == sorted(sizes, reverse=True) and result["rows"][0]["scheme"] == "reference (float32)"
    assert result["reference"] == f"{tiny_model_dir} (float32)" and result["bos"] is False
    rows = {row["scheme"]: row for row in result["rows"][1:]}
    assert all(row["kl_divergence_se"] > 0 for row in rows.values())
    from lowbit.eval.verdict import verdict

    assert result["verdict"] == verdict(list(rows.values()))
    assert set(result["verdict"]["budgets"]) == {"near-lossless", "good"}
