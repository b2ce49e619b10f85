"""Plans: which layer gets which format and algorithm.

A plan is an ordered list of rules. Each rule is a glob pattern over module names
(``"*.mlp.down_proj"``, ``"lm_head"``, ``"*"``) and what to do with the linear layers it
matches: keep them as they are, or quantize them to a format with an algorithm. The first
matching rule wins; a linear that no rule matches is kept.

A *scheme* is what users type: a preset (``int4-g128``, ``nf4-dq`` …), any format name, or a
plan file (YAML or JSON). A preset or format name may carry algorithm modifiers after ``+``:
``int4-g128+clip`` runs RTN with the clipping search. Presets keep ``lm_head`` (and the
embeddings, which are never linears) in their original precision. The W8A8 presets also
quantize each linear's input at run time: ``w8a8`` is INT8 weights per channel with dynamic
INT8 activations per token, ``w8a8-fp8`` the same in FP8 E4M3 (a rule's ``activations``).

Plan file::

    # the first matching rule wins
    rules:
      "lm_head": keep
      "*.mlp.down_proj": int8
      "*.self_attn.*": int4-g128+clip
      "*.mlp.*": {format: int4-g128, method: awq}
      "*": {format: nf4, algorithm: rtn, clip_search: true}

(``method`` and ``algorithm`` are the same key.)

(A file may also be the rules mapping alone, without the ``rules:`` key.)
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lowbit.algorithms import AlgorithmConfig, RTNConfig, config_class, method_names
from lowbit.errors import LowbitError, UnknownNameError
from lowbit.formats import NAME_GRAMMAR, Format, get_format
from lowbit.kernels.activation import activation_quantizer

KEEP = "keep"
#: the algorithm a rule runs when it names none
DEFAULT_METHOD = RTNConfig.method

#: preset name -> format of every linear but ``lm_head``
PRESETS = {
    "bf16": "bf16",
    "fp16": "fp16",
    "int8": "int8",
    "w8-g128": "int8-g128",
    "int4-g128": "int4-g128",
    "int4-g32": "int4-g32",
    "int4-sym-g128": "int4-sym-g128",
    "nf4": "nf4",
    "nf4-dq": "nf4-dq",
    "int3-g128": "int3-g128",
    "int2-g64": "int2-g64",
    "fp8": "fp8",
    "mxfp4": "mxfp4",
    "w8a8": "int8",
    "w8a8-fp8": "fp8",
}
#: preset name -> the activation quantizer of its linears
PRESET_ACTIVATIONS = {"w8a8": "int8-per-token", "w8a8-fp8": "fp8-per-token"}

#: ``+modifier`` -> algorithm options it sets
MODIFIERS = {"clip": {"clip_search": True}}

#: modules every preset keeps in full precision
PRESET_KEEP = ("lm_head",)


@dataclass(frozen=True)
class Rule:
    """Linears whose name matches ``pattern`` get ``format`` through ``config`` (None: kept);
    ``activations`` names the quantizer of their inputs at run time (W8A8), if any."""

    pattern: str
    format: Format | None
    config: AlgorithmConfig = field(default_factory=RTNConfig)
    activations: str | None = None

    @property
    def algorithm(self) -> str:
        return self.config.method

    @property
    def options(self) -> dict:
        """The algorithm's options that differ from its defaults."""
        return self.config.options()

    def matches(self, module_name: str) -> bool:
        return fnmatch.fnmatchcase(module_name, self.pattern)

    def describe(self) -> str:
        if self.format is None:
            return KEEP
        extras = "".join(f" {k}={v}" for k, v in self.options.items())
        inputs = f", activations {self.activations}" if self.activations else ""
        return f"{self.format.name} ({self.algorithm}{extras}{inputs})"

    def to_dict(self) -> dict:
        if self.format is None:
            return {"pattern": self.pattern, "format": KEEP}
        activations = {"activations": self.activations} if self.activations else {}
        return {"pattern": self.pattern, "format": self.format.name, "algorithm": self.algorithm, **activations, **self.options}


@dataclass
class Plan:
    rules: list[Rule]
    name: str = "custom"

    def rule_for(self, module_name: str) -> Rule | None:
        """The rule that decides ``module_name``, or None when no rule matches."""
        for rule in self.rules:
            if rule.matches(module_name):
                return rule
        return None

    def unused_rules(self, module_names: list[str]) -> list[Rule]:
        return [rule for rule in self.rules if not any(rule.matches(n) for n in module_names)]

    def to_dict(self) -> dict:
        return {"name": self.name, "rules": [rule.to_dict() for rule in self.rules]}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """The plan :meth:`to_dict` wrote (a checkpoint manifest's ``plan``), checked like a plan file."""
        rules = []
        for entry in data["rules"]:
            entry = dict(entry)
            pattern, fmt = entry.pop("pattern"), entry.pop("format")
            if not isinstance(pattern, str):
                raise LowbitError(f"a plan rule's pattern must be a string, got {pattern!r}")
            rules.append(make_rule(pattern, {"format": fmt, **entry}))
        return cls(rules, data.get("name", "custom"))


Method = str | AlgorithmConfig


def make_rule(pattern: str, spec: str | dict | None, method: Method = DEFAULT_METHOD) -> Rule:
    """A checked rule from a plan entry: ``"keep"``, ``"int4-g128+clip"`` or a mapping.

    ``method`` is the algorithm of an entry that names none (a method name, or a config whose
    options the entry's own options then override). A mapping names its own with
    ``method:`` (or ``algorithm:``), and its activation quantizer with ``activations:``.
    """
    if spec is None or spec == KEEP:
        return Rule(pattern, None)
    if isinstance(spec, str):
        fmt_text, options, activations = _split_modifiers(spec)
    elif isinstance(spec, dict):
        spec = dict(spec)
        if "format" not in spec:
            raise LowbitError(f"plan rule {pattern!r} needs a 'format' (or 'keep'), got {spec}")
        text = spec.pop("format")
        if text == KEEP:
            return Rule(pattern, None)
        fmt_text, options, activations = _split_modifiers(str(text))
        if "method" in spec and "algorithm" in spec:
            raise LowbitError(f"plan rule {pattern!r} names both 'method' and 'algorithm'; they are the same key, give one")
        method = spec.pop("method", spec.pop("algorithm", method))
        activations = spec.pop("activations", activations)
        activation_quantizer(activations)  # a clear error for an unknown name
        options = {**options, **spec}
    else:
        raise LowbitError(f"plan rule {pattern!r} must be a format name, 'keep' or a mapping, got {spec!r}")
    fmt = get_format(fmt_text)
    if isinstance(method, AlgorithmConfig):
        config = type(method).from_options({**method.options(), **options})
    else:
        config = config_class(str(method)).from_options(options)
    if config.options().get("clip_search") and not fmt.supports_clip:
        raise LowbitError(f"{fmt.name} has no clipping search (its scales are fixed by the format); drop '+clip'")
    return Rule(pattern, fmt, config, activations)


def _split_modifiers(text: str) -> tuple[str, dict, str | None]:
    """``(format name, algorithm options, activation quantizer)`` of a preset or format name with modifiers."""
    base, *modifiers = [part.strip() for part in text.split("+")]
    options: dict = {}
    for modifier in modifiers:
        if modifier not in MODIFIERS:
            raise UnknownNameError(
                f"unknown modifier '+{modifier}' in {text!r}; modifiers: {', '.join('+' + m for m in MODIFIERS)}"
            )
        options.update(MODIFIERS[modifier])
    return PRESETS.get(base, base), options, PRESET_ACTIVATIONS.get(base)


def preset_plan(scheme: str, method: Method = DEFAULT_METHOD) -> Plan:
    """The plan of a preset or format name, with optional ``+modifiers``, run by ``method``."""
    base = scheme.split("+")[0].strip()
    try:
        rule = make_rule("*", scheme, method)
    except UnknownNameError as error:
        if base in PRESETS or not str(error).startswith("unknown format"):
            raise
        raise UnknownNameError(
            f"unknown scheme {scheme!r}. Presets: {', '.join(PRESETS)}. "
            f"Any format name also works ({NAME_GRAMMAR}), as does a plan file (.yaml or .json)."
        ) from None
    name = scheme if rule.algorithm == DEFAULT_METHOD else f"{scheme} ({rule.algorithm})"
    return Plan([Rule(pattern, None) for pattern in PRESET_KEEP] + [rule], name)


def _unique_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"pattern {repeated[0]!r} appears twice; rules are ordered, give each pattern once")
    return dict(pairs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (it would silently drop a rule)."""

    def construct_mapping(self, node, deep=False):
        pairs = [(self.construct_object(k, deep=deep), self.construct_object(v, deep=deep)) for k, v in node.value]
        return _unique_keys(pairs)


def load_plan_file(path: str | Path, method: Method = DEFAULT_METHOD) -> Plan:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise LowbitError(f"cannot read plan file {path}: {error.strerror}") from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if path.suffix == ".json" else yaml.load(text, _UniqueKeyLoader)
    except (json.JSONDecodeError, yaml.YAMLError, ValueError) as error:
        raise LowbitError(f"plan file {path} is not valid {path.suffix[1:].upper()}: {error}") from None
    if isinstance(data, dict) and "rules" in data:
        data = data["rules"]
    if isinstance(data, list) and data and all(isinstance(entry, dict) for entry in data):
        # the form Plan.to_dict writes (a checkpoint manifest's plan)
        try:
            return Plan.from_dict({"rules": data, "name": path.name})
        except (KeyError, TypeError, AttributeError):
            raise LowbitError(f"plan file {path}: a list of rules needs 'pattern' and 'format' in every entry") from None
    if not isinstance(data, dict) or not data:
        raise LowbitError(
            f"plan file {path} must map glob patterns to formats, e.g. {{'lm_head': 'keep', '*': 'int4-g128'}}"
        )
    return Plan([make_rule(str(pattern), spec, method) for pattern, spec in data.items()], path.name)


def resolve_scheme(scheme: str | Plan, method: Method | None = None) -> Plan:
    """A Plan from what the user gave: a Plan, a plan file path, a preset or a format name.

    ``method`` (a method name such as ``"rtn"``, or a config such as ``RTNConfig(clip_search=True)``)
    runs every rule that names no algorithm of its own; default RTN.
    """
    if isinstance(scheme, Plan):
        if method is not None:
            raise LowbitError("a Plan names its algorithms in its rules; give the method with a scheme name or in the plan file")
        return scheme
    if not isinstance(scheme, str):
        raise LowbitError(f"a scheme is a preset or format name, a plan file or a Plan, got {scheme!r}")
    if method is not None and not isinstance(method, (str, AlgorithmConfig)):
        raise LowbitError(f"a method is a name ({', '.join(method_names())}) or an algorithm config, got {method!r}")
    method = DEFAULT_METHOD if method is None else method
    if scheme.endswith((".yaml", ".yml", ".json")):
        if not Path(scheme).is_file():
            raise LowbitError(f"plan file {scheme} does not exist")
        return load_plan_file(scheme, method)
    return preset_plan(scheme, method)
