"""The answer after a comparison (``lowbit.eval.verdict``) and ``lowbit recipe``: the ladder,
budgets met with a margin of two standard errors, the walk stopping where the recipe says, and
a command that reproduces what was measured."""

from __future__ import annotations

import pytest

import lowbit
from lowbit.eval.verdict import (
    QUALITY_BUDGETS,
    Rung,
    ladder,
    meets,
    next_steps,
    smallest_within,
    verdict,
)


def row(scheme, bits, size, kl, se=0.0):
    return {"scheme": scheme, "bits_per_weight": bits, "weight_bytes": size, "kl_divergence": kl, "kl_divergence_se": se}


def test_ladder_names_only_methods_that_exist():
    assert [r.label for r in ladder(["rtn"])] == ["int8", "int4-g128", "int4-g128+clip"]
    assert [r.label for r in ladder(["gptq", "rtn"])] == ["int8", "int4-g128", "int4-g128+clip", "int4-g128 (gptq)"]
    assert [r.label for r in ladder()][-1] == "int4-g128 (gptq)"  # GPTQ is registered today
    assert Rung("int4-g128", "gptq").options() == "--scheme int4-g128 --method gptq"
    assert Rung("int4-g128+clip").calibrated and Rung("int4-g128", "gptq").calibrated and not Rung("int8").calibrated


def test_a_budget_is_met_with_two_standard_errors_of_margin():
    assert meets(row("a", 4, 1, 0.05, 0.02), 0.1)  # 0.09 < 0.1
    assert not meets(row("a", 4, 1, 0.05, 0.03), 0.1)  # 0.11: borderline
    assert not meets(row("a", 4, 1, None), 0.1)
    rows = [row("int8", 8, 200, 0.003, 0.0001), row("fp8", 8.05, 201, 0.018, 0.002), row("int4", 4.2, 110, 0.09, 0.01)]
    best, borderline = smallest_within(rows, 0.1)
    assert best["scheme"] == "int8" and [r["scheme"] for r in borderline] == ["int4"]
    best, borderline = smallest_within(rows, 0.02)
    assert best["scheme"] == "int8" and borderline == []  # fp8 is larger than int8, so not listed
    assert smallest_within(rows, 0.001) == (None, [])


def test_verdict_follows_the_recipe():
    int8, int4 = row("int8", 8.02, 200, 0.003, 0.0001), row("int4-g128", 4.17, 110, 0.34, 0.01)
    answer = verdict([int8, int4], methods=["gptq", "rtn"])
    assert answer["budgets"] == {
        "near-lossless": {"max_kl": 0.02, "scheme": "int8", "borderline": []},
        "good": {"max_kl": 0.1, "scheme": "int8", "borderline": []},
    }
    (step,) = answer["next"]
    assert "`--scheme int4-g128+clip`" in step and "`--scheme int4-g128 --method gptq`" in step
    assert "gptq" not in next_steps([int8, int4], 0.1, methods=["rtn"])[0]  # only methods that exist
    tried = [int8, int4, row("int4-g128+clip", 4.17, 110, 0.2, 0.01), row("int4-g128 (gptq)", 4.17, 110, 0.15, 0.01)]
    assert "bigger model" in next_steps(tried, 0.1, methods=["gptq", "rtn"])[0]
    assert "measure int8 first" in next_steps([int4], 0.1)[0]
    assert "even 8 bits misses" in next_steps([row("int8", 8, 200, 0.5, 0.01), int4], 0.1)[0]
    assert "4-bit scheme meets" in next_steps([int8, row("int4", 4.2, 110, 0.05, 0.001)], 0.1)[0]
    assert QUALITY_BUDGETS == {"near-lossless": 0.02, "good": 0.1}


@pytest.fixture(scope="module")
def measured(tiny_model_dir, eval_text_file):
    """KL of every rung of the ladder on the tiny model, from compare."""
    from lowbit.plan import resolve_scheme

    plans = [resolve_scheme(rung.scheme, rung.method) for rung in ladder()]
    result = lowbit.compare(tiny_model_dir, plans, data=eval_text_file, windows=4, window_length=16, progress=False)
    return {row["scheme"]: row for row in result["rows"][1:]}


def recipe(tiny_model_dir, eval_text_file, max_kl):
    return lowbit.recipe(tiny_model_dir, max_kl=max_kl, data=eval_text_file, windows=4, window_length=16, progress=False)


def test_recipe_stops_at_the_first_4bit_rung_within_budget(tiny_model_dir, eval_text_file, measured):
    result = recipe(tiny_model_dir, eval_text_file, 100.0)  # every rung meets it: the first 4-bit one is the answer
    assert [r["scheme"] for r in result["rows"]] == ["reference (float32)", "int8", "int4-g128"]
    assert result["answer"] == "int4-g128"
    assert result["command"] == f"lowbit quantize {tiny_model_dir} --scheme int4-g128 -o OUT"  # not calibrated
    for r in result["rows"][1:]:  # the same numbers compare measures
        assert r["kl_divergence"] == pytest.approx(measured[r["scheme"]]["kl_divergence"], rel=1e-9)


def test_recipe_stops_when_even_int8_misses(tiny_model_dir, eval_text_file, measured):
    result = recipe(tiny_model_dir, eval_text_file, measured["int8"]["kl_divergence"] / 2)
    assert [r["scheme"] for r in result["rows"][1:]] == ["int8"]
    assert result["answer"] is None and result["command"] is None and "bigger model" in result["advice"]


def test_recipe_answers_int8_when_no_4bit_rung_meets(tiny_model_dir, eval_text_file, measured):
    upper = measured["int8"]["kl_divergence"] + 2 * measured["int8"]["kl_divergence_se"]
    four_bit = min(r["kl_divergence"] for name, r in measured.items() if name != "int8")
    if not upper < four_bit:
        pytest.skip("on this tiny model int8's margin reaches a 4-bit rung")
    result = recipe(tiny_model_dir, eval_text_file, (upper + four_bit) / 2)
    assert [r["scheme"] for r in result["rows"][1:]] == [r.label for r in ladder()]  # walked every rung
    assert result["answer"] == "int8" and result["command"].endswith("--scheme int8 -o OUT")


def test_the_recipe_command_reproduces_the_measurement(tiny_model_dir, eval_text_file, tmp_path, measured):
    """Running the printed command and evaluating its output gives the KL the recipe measured."""
    from lowbit.cli import main

    result = recipe(tiny_model_dir, eval_text_file, 100.0)
    out = tmp_path / "out"
    arguments = result["command"].split()[1:-1] + [str(out)]
    assert main(arguments) == 0
    evaluated = lowbit.evaluate(out, reference=tiny_model_dir, data=eval_text_file, windows=4, window_length=16, progress=False)
    # the recipe's KL comes from the reference's summary, evaluate's from full distributions (1e-5
    # apart); and the recipe measures with the reference's own kept tensors while the checkpoint
    # stores them in 16 bits (5e-4 apart here)
    assert evaluated["kl_divergence"] == pytest.approx(result["rows"][-1]["kl_divergence"], rel=2e-3)
    assert evaluated["weight_bytes"] == result["rows"][-1]["weight_bytes"]


def test_recipe_refuses_a_bad_budget(monkeypatch):
    from lowbit import api

    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded a model for a bad budget"))
    for bad in (0, -1, "0.1", True):
        with pytest.raises(lowbit.LowbitError, match="KL budget must be a positive number"):
            lowbit.recipe("anything", max_kl=bad)
