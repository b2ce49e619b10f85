"""Plans (``lowbit/plan.py``): presets, modifiers, plan files, first-match-wins, and the
errors a user meets when a scheme is wrong (each lists what would have been valid)."""

from __future__ import annotations

import json

import pytest
import yaml

from lowbit.algorithms import RTNConfig, method_names
from lowbit.errors import LowbitError, UnknownNameError
from lowbit.formats import get_format
from lowbit.plan import (
    KEEP,
    MODIFIERS,
    PRESET_KEEP,
    PRESETS,
    Plan,
    Rule,
    load_plan_file,
    make_rule,
    resolve_scheme,
)

#: module names of a llama-like model, to run plans against without building one
MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.11.mlp.down_proj",
    "lm_head",
]


def decide(plan: Plan) -> dict[str, str | None]:
    """module -> format (None: kept) under ``plan``, as the pipeline reads it."""
    decided = {}
    for name in MODULES:
        rule = plan.rule_for(name)
        decided[name] = None if rule is None or rule.format is None else rule.format.name
    return decided


# -- presets -----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_keeps_lm_head_and_quantizes_the_rest(preset):
    plan = resolve_scheme(preset)
    assert plan.name == preset
    fmt = get_format(PRESETS[preset]).name
    assert plan.rules[0] == Rule("lm_head", None)
    assert [r.pattern for r in plan.rules] == [*PRESET_KEEP, "*"]
    assert decide(plan) == {name: (None if name == "lm_head" else fmt) for name in MODULES}
    assert plan.rules[-1].algorithm == "rtn" and plan.rules[-1].options == {}


def test_w8_g128_alias_expands_to_its_format():
    assert resolve_scheme("w8-g128").rules[-1].format.name == "int8-g128"


def test_format_names_are_schemes_too():
    plan = resolve_scheme("int5-asym-g48")
    assert plan.rules[-1].format.name == "int5-g48"  # canonical name: asymmetric is int5's default
    assert plan.rules[0] == Rule("lm_head", None)


def test_clip_modifier_sets_clip_search():
    plan = resolve_scheme("int4-g128+clip")
    rule = plan.rules[-1]
    assert (rule.format, rule.algorithm, rule.options) == (get_format("int4-g128"), "rtn", {"clip_search": True})
    assert rule.config == RTNConfig(clip_search=True)
    assert plan.name == "int4-g128+clip"
    assert rule.describe() == "int4-g128 (rtn clip_search=True)"
    assert plan.to_dict() == {
        "name": "int4-g128+clip",
        "rules": [
            {"pattern": "lm_head", "format": KEEP},
            {"pattern": "*", "format": "int4-g128", "algorithm": "rtn", "clip_search": True},
        ],
    }
    assert MODIFIERS["clip"] == {"clip_search": True}


def test_plan_dict_round_trip():
    plan = Plan(
        [
            make_rule("lm_head", KEEP),
            make_rule("*.down_proj", {"format": "nf4", "clip_search": True, "clip_min": 0.7}),
            make_rule("*", "int8"),
        ],
        "mine",
    )
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan


def test_options_equal_to_defaults_are_not_stored():
    defaults = RTNConfig.defaults()
    rule = make_rule("*", {"format": "int4-g128", **defaults})
    assert rule.options == {}


# -- errors that list what is valid ---------------------------------------------------------


def test_unknown_scheme_lists_presets_and_grammar():
    with pytest.raises(UnknownNameError) as error:
        resolve_scheme("int4-g128x")
    message = str(error.value)
    assert "unknown scheme 'int4-g128x'" in message
    for preset in PRESETS:
        assert preset in message
    assert "int{2..8}" in message and "plan file" in message
    assert isinstance(error.value, LowbitError)


@pytest.mark.parametrize("scheme", ["", "+clip", "gguf:q4_k", "q4_0"])
def test_other_unknown_schemes(scheme):
    with pytest.raises(LowbitError, match="unknown scheme"):
        resolve_scheme(scheme)


def test_unknown_modifier_lists_modifiers():
    with pytest.raises(UnknownNameError, match=r"unknown modifier '\+gptq'.*modifiers: \+clip"):
        resolve_scheme("int4-g128+gptq")
    with pytest.raises(UnknownNameError, match="unknown modifier"):
        resolve_scheme("nf4+")


def test_unknown_format_in_rule_lists_grammar():
    with pytest.raises(UnknownNameError, match=r"unknown format 'int9'.*int\{2\.\.8\}"):
        make_rule("*", "int9")


def test_unknown_algorithm_lists_algorithms():
    with pytest.raises(UnknownNameError) as error:
        make_rule("*", {"format": "int4-g128", "algorithm": "no-such-method"})
    assert "unknown algorithm 'no-such-method'" in str(error.value)
    for name in method_names():
        assert name in str(error.value)


def test_unknown_algorithm_option_lists_options():
    with pytest.raises(LowbitError) as error:
        make_rule("*", {"format": "int4-g128", "damp": 0.01})
    message = str(error.value)
    assert "no option 'damp'" in message
    for option in RTNConfig.defaults():
        assert option in message


def test_rule_mapping_needs_a_format():
    with pytest.raises(LowbitError, match="needs a 'format'"):
        make_rule("*", {"algorithm": "rtn"})
    with pytest.raises(LowbitError, match="must be a format name"):
        make_rule("*", 4)


@pytest.mark.parametrize("scheme", ["mxfp4+clip", "bf16+clip", "fp16+clip"])
def test_clip_on_a_format_without_clipping_errors(scheme):
    with pytest.raises(LowbitError, match=r"has no clipping search.*drop '\+clip'"):
        resolve_scheme(scheme)


@pytest.mark.parametrize("scheme", ["int4-g0", "int8-g0", "nf4-g0", "int4-g65537"])
def test_group_size_out_of_range_errors(scheme):
    with pytest.raises(LowbitError, match="must be"):
        resolve_scheme(scheme)


@pytest.mark.parametrize("options", [{"clip_grid": 0}, {"clip_min": "abc"}, {"clip_min": 1.5}, {"clip_search": "yes"}])
def test_bad_option_values_are_refused(options):
    with pytest.raises(LowbitError):
        make_rule("*", {"format": "int4-g128", "clip_search": True, **options})


# -- first match wins ----------------------------------------------------------------------


def test_first_match_wins():
    plan = Plan(
        [make_rule("*.11.mlp.*", KEEP), make_rule("*.down_proj", "int8"), make_rule("*.mlp.*", "nf4"), make_rule("*", "int4-g32")]
    )
    assert decide(plan) == {
        "model.layers.0.self_attn.q_proj": "int4-g32",
        "model.layers.0.self_attn.k_proj": "int4-g32",
        "model.layers.0.mlp.gate_proj": "nf4",
        "model.layers.0.mlp.down_proj": "int8",
        "model.layers.11.mlp.down_proj": None,
        "lm_head": "int4-g32",
    }
    # reversing the order changes the answer: the catch-all now decides everything
    reversed_plan = Plan(list(reversed(plan.rules)))
    assert set(decide(reversed_plan).values()) == {"int4-g32"}


def test_unmatched_module_is_kept_and_unused_rules_are_reported():
    plan = Plan([make_rule("*.q_proj", "int8"), make_rule("*.no_such", "int8")])
    assert decide(plan)["model.layers.0.mlp.gate_proj"] is None
    assert [r.pattern for r in plan.unused_rules(MODULES)] == ["*.no_such"]


def test_glob_patterns_are_case_sensitive_and_whole_name():
    rule = make_rule("*.Q_PROJ", "int8")
    assert not rule.matches("model.layers.0.self_attn.q_proj")
    assert not make_rule("q_proj", "int8").matches("model.layers.0.self_attn.q_proj")
    assert make_rule("model.layers.[0-3].*", "int8").matches("model.layers.2.mlp.up_proj")
    assert not make_rule("model.layers.[0-3].*", "int8").matches("model.layers.5.mlp.up_proj")


# -- plan files ----------------------------------------------------------------------------

YAML_WITH_RULES = """\
# the first matching rule wins
rules:
  "lm_head": keep
  "*.mlp.down_proj": int8
  "*.self_attn.*": int4-g128+clip
  "*": {format: nf4, algorithm: rtn, clip_search: true}
"""

YAML_BARE = """\
"*.mlp.down_proj": {format: int8}
"*.mlp.*": keep
"*": int4-g32
"""


def expected_from_yaml_with_rules():
    return {
        "model.layers.0.self_attn.q_proj": "int4-g128",
        "model.layers.0.self_attn.k_proj": "int4-g128",
        "model.layers.0.mlp.gate_proj": "nf4",
        "model.layers.0.mlp.down_proj": "int8",
        "model.layers.11.mlp.down_proj": "int8",
        "lm_head": None,
    }


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_plan_with_rules_key(tmp_path, suffix):
    path = tmp_path / f"plan{suffix}"
    path.write_text(YAML_WITH_RULES)
    plan = resolve_scheme(str(path))
    assert plan.name == path.name
    assert decide(plan) == expected_from_yaml_with_rules()
    assert plan.rule_for("model.layers.0.self_attn.q_proj").options == {"clip_search": True}
    assert plan.rule_for("model.layers.0.mlp.gate_proj").options == {"clip_search": True}
    assert [r.pattern for r in plan.rules] == ["lm_head", "*.mlp.down_proj", "*.self_attn.*", "*"]


def test_yaml_plan_without_rules_key(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(YAML_BARE)
    plan = load_plan_file(path)
    assert decide(plan) == {
        "model.layers.0.self_attn.q_proj": "int4-g32",
        "model.layers.0.self_attn.k_proj": "int4-g32",
        "model.layers.0.mlp.gate_proj": None,
        "model.layers.0.mlp.down_proj": "int8",  # first match wins over "*.mlp.*": keep
        "model.layers.11.mlp.down_proj": "int8",
        "lm_head": "int4-g32",  # a plan file keeps only what it says
    }


@pytest.mark.parametrize("wrapped", [True, False])
def test_json_plan(tmp_path, wrapped):
    rules = {
        "lm_head": "keep",
        "*.mlp.down_proj": "int8",
        "*.self_attn.*": "int4-g128+clip",
        "*": {"format": "nf4", "clip_search": True},
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"rules": rules} if wrapped else rules))
    plan = resolve_scheme(str(path))
    assert decide(plan) == expected_from_yaml_with_rules()
    yaml_path = tmp_path / "same.yaml"
    yaml_path.write_text(YAML_WITH_RULES)
    assert plan.rules == load_plan_file(yaml_path).rules


def test_keep_as_mapping_and_null(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text('"*.q_proj": {format: keep}\n"*.k_proj":\n"*": int8\n')
    plan = load_plan_file(path)
    assert decide(plan)["model.layers.0.self_attn.q_proj"] is None
    assert decide(plan)["model.layers.0.self_attn.k_proj"] is None
    assert decide(plan)["model.layers.0.mlp.gate_proj"] == "int8"


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("bad.yaml", "rules: [\n  a: b", "not valid YAML"),
        ("bad.json", '{"*": "int8",', "not valid JSON"),
        ("empty.yaml", "", "must map glob patterns"),
        ("empty.json", "{}", "must map glob patterns"),
        ("list.yaml", "- int8\n- nf4\n", "must map glob patterns"),
        ("emptyrules.yaml", "rules:\n", "must map glob patterns"),
        ("scalar.yaml", "int8\n", "must map glob patterns"),
        ("unknown.yaml", '"*": int9\n', "unknown format 'int9'"),
        ("unknown-modifier.yaml", '"*": int4-g128+awq\n', "unknown modifier"),
        ("clip-mx.yaml", '"*": mxfp4+clip\n', "no clipping search"),
        ("option.yaml", '"*": {format: int8, group: 4}\n', "no option 'group'"),
        ("noformat.yaml", '"*": {clip_search: true}\n', "needs a 'format'"),
        ("number.yaml", '"*": 8\n', "must be a format name"),
    ],
)
def test_bad_plan_files(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LowbitError) as error:
        resolve_scheme(str(path))
    assert words in str(error.value)


def test_missing_plan_file(tmp_path):
    with pytest.raises(LowbitError, match="does not exist"):
        resolve_scheme(str(tmp_path / "nope.yaml"))
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(LowbitError, match="does not exist"):
        resolve_scheme(str(tmp_path / "dir.json"))


def test_plan_is_passed_through():
    plan = Plan([make_rule("*", "int8")])
    assert resolve_scheme(plan) is plan


def test_manifest_plan_is_a_plan_file(tmp_path):
    plan = resolve_scheme("int4-g32+clip")
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan.to_dict()))
    loaded = load_plan_file(path)
    assert [r.to_dict() for r in loaded.rules] == [r.to_dict() for r in plan.rules]


@pytest.mark.parametrize("suffix, text", [(".yaml", '"*": int8\n"*": nf4\n'), (".json", '{"*": "int8", "*": "nf4"}')])
def test_repeated_pattern_is_refused(tmp_path, suffix, text):
    path = tmp_path / f"plan{suffix}"
    path.write_text(text)
    with pytest.raises(LowbitError, match="appears twice"):
        load_plan_file(path)


# -- methods ---------------------------------------------------------------------------------


def test_method_runs_every_rule_that_names_none(tmp_path):
    plan = resolve_scheme("int4-g128+clip", method="rtn")
    assert plan.rules[-1].config == RTNConfig(clip_search=True) and plan.name == "int4-g128+clip"
    configured = resolve_scheme("int4-g128", method=RTNConfig(clip_search=True, clip_grid=5))
    assert configured.rules[-1].config == RTNConfig(clip_search=True, clip_grid=5)
    # an entry's own options override the method's; its own algorithm wins
    path = tmp_path / "plan.yaml"
    path.write_text('"*.q_proj": {format: int8, clip_grid: 7}\n"*": {format: nf4, algorithm: rtn}\n')
    loaded = resolve_scheme(str(path), method=RTNConfig(clip_search=True, clip_grid=5))
    assert loaded.rules[0].config == RTNConfig(clip_search=True, clip_grid=7)
    assert loaded.rules[1].config == RTNConfig()


def test_bad_methods_are_refused():
    with pytest.raises(UnknownNameError, match="unknown algorithm 'nope'"):
        resolve_scheme("int4-g128", method="nope")
    with pytest.raises(LowbitError, match="a method is a name"):
        resolve_scheme("int4-g128", method=3)
    with pytest.raises(LowbitError, match="names its algorithms"):
        resolve_scheme(resolve_scheme("int8"), method="rtn")
    with pytest.raises(LowbitError, match="a scheme is a preset"):
        resolve_scheme(None)
