"""llama-quantize's mixes (``Q4_K_M`` …): the ggml type of every tensor, chosen as llama.cpp chooses.

This is the one place lowbit decides a GGUF tensor's type: the GGUF writer
(``lowbit.export.gguf``) quantizes by it and the sizing advisor (``lowbit.advisor.gguf_mixes``)
sizes by it. It is a port of ``llama_tensor_get_type`` and its helpers in src/llama-quant.cpp
of llama.cpp as vendored in llama-cpp-python 0.3.36 (read from that file, not from memory):

- tensors are visited in llama.cpp's order (tensors outside the blocks first, then block by
  block, by name within a block: ``weight_name_comparer``), and the ``attn_v`` / ``ffn_down``
  rules key on llama.cpp's counters (``i_attention_wv``, ``i_ffn_down`` …) as it does, so
  ``use_more_bits`` and "the first N" pick the same layers;
- ``output.weight`` (and ``token_embd.weight`` when there is no ``output.weight``: tied
  embeddings) gets Q6_K, or Q8_0 when its rows are not a multiple of the mix's block;
- options as ``llama-quantize`` has them: ``--output-tensor-type``, ``--token-embedding-type``,
  ``--pure`` (one type everywhere), ``--tensor-type REGEX=TYPE`` (first match wins), and the
  rules that change with an importance matrix (``has_imatrix``);
- a row that is not a multiple of the chosen type's block falls back as
  ``tensor_type_fallback`` does (Q4_K -> Q5_0, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL …, F16 when even
  that does not divide), each with a note worded as llama.cpp's warning.

Only what lowbit's families reach is ported: the dense and mixture-of-experts rules of the
mixes below; Falcon's and the IQ1/IQ2/IQ3 mixes' branches are not (those mixes are not
offered). ``LLM_TYPE_70B`` is approximated as llama.cpp's loader sets it for Llama and Qwen2:
80 layers with grouped-query attention.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import gguf

from lowbit.errors import LowbitError, UnknownNameError
from lowbit.formats.gguf_types import GGML_TYPES, TENSOR_TYPE_FALLBACK

#: mix name -> the type most tensors get (``llama_ftype_get_default_type``)
MIX_BASE_TYPES: dict[str, str] = {
    "F32": "F32",
    "F16": "F16",
    "BF16": "BF16",
    "Q8_0": "Q8_0",
    "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K",
    "Q5_K_S": "Q5_K",
    "Q5_1": "Q5_1",
    "Q5_0": "Q5_0",
    "Q4_K_M": "Q4_K",
    "Q4_K_S": "Q4_K",
    "Q4_1": "Q4_1",
    "Q4_0": "Q4_0",
    "IQ4_XS": "IQ4_XS",
    "IQ4_NL": "IQ4_NL",
    "Q3_K_L": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_S": "Q3_K",
    "Q2_K": "Q2_K",
}
MIXES = tuple(MIX_BASE_TYPES)
UNQUANTIZED_TYPES = frozenset({"F32", "F16", "BF16"})


def mix_name(name: str) -> str:
    """The canonical mix name of ``name`` (``q4_k_m``, ``gguf:Q4_K_M`` -> ``Q4_K_M``)."""
    key = name.strip().upper().removeprefix("GGUF:").replace("-", "_")
    if key not in MIX_BASE_TYPES:
        raise UnknownNameError(f"unknown GGUF type {name!r}; types: {', '.join(MIXES)}")
    return key


def type_name(name: str) -> str:
    """A ggml tensor type lowbit can write (``q6_k`` -> ``Q6_K``), or a clear error."""
    key = name.strip().upper()
    if key not in GGML_TYPES:
        raise UnknownNameError(f"unknown ggml tensor type {name!r}; types: {', '.join(GGML_TYPES)}")
    return key


def file_type(mix: str) -> int:
    """``general.file_type`` of a mix (llama.cpp's ``llama_ftype``)."""
    mix = mix_name(mix)
    return int(gguf.LlamaFileType.ALL_F32 if mix == "F32" else gguf.LlamaFileType[f"MOSTLY_{mix}"])


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's rules read from the model's hyperparameters."""

    layers: int
    heads: int
    kv_heads: int
    experts: int = 0  # 0 or 1: a dense model

    @property
    def gqa(self) -> int:
        """``n_gqa()``: query heads per key/value head (integer division, as llama.cpp)."""
        return self.heads // max(1, self.kv_heads)

    @property
    def is_70b(self) -> bool:
        return self.layers == 80 and self.heads != self.kv_heads


@dataclass(frozen=True)
class MixOptions:
    """llama-quantize's options that change types. Type names are ggml's (``Q6_K``)."""

    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    #: ``(regex, type)``: the first regex found in a tensor's name decides its type
    tensor_types: tuple[tuple[str, str], ...] = ()
    has_imatrix: bool = False

    def __post_init__(self) -> None:
        for pattern, _ in self.tensor_types:
            try:
                re.compile(pattern)
            except re.error as error:
                raise LowbitError(f"--tensor-type pattern {pattern!r} is not a regular expression: {error}") from None


@dataclass(frozen=True)
class TensorSite:
    """One tensor as llama-quantize sees it: its GGUF name and torch shape (rows are ``shape[-1]``)."""

    name: str
    shape: tuple[int, ...]


@dataclass
class MixChoice:
    """The type of every tensor, and llama.cpp's fallback warnings."""

    types: dict[str, str]
    notes: list[str] = field(default_factory=list)

    @property
    def fallbacks(self) -> int:
        return len(self.notes)

    def summary(self) -> str | None:
        """llama.cpp's closing warning, or None when no tensor fell back."""
        if not self.notes:
            return None
        return f"{self.fallbacks} of {len(self.types)} tensor(s) required fallback quantization"


def _layer(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def llama_cpp_order(sites: Sequence[TensorSite]) -> list[TensorSite]:
    """llama.cpp's ``weight_name_comparer``: by block (tensors outside blocks first), then by name."""
    return sorted(sites, key=lambda site: (_layer(site.name), site.name))


def allows_quantization(site: TensorSite) -> bool:
    """``tensor_allows_quantization`` for lowbit's families: 2-D ``*weight`` tensors but norms and routers."""
    name = site.name
    dims = len(site.shape) - next((i for i, n in enumerate(site.shape[:-1]) if n != 1), len(site.shape) - 1)
    return (
        dims >= 2  # ggml_n_dims: a (1, n) tensor is 1-D to ggml
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
        and "ssm_conv1d" not in name
    )


def _category(name: str) -> str:
    """``tensor_get_category``: substring tests, in llama.cpp's order."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for category in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
                     "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):  # fmt: skip
        if category in name:
            return category.removesuffix(".weight")
    return "other"


ATTN_V_LIKE = frozenset({"attn_v", "attn_qkv", "attn_kv_b"})


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


class _Chooser:
    """``quantize_state_impl`` and the functions that read it, for one model and one mix."""

    def __init__(self, sites: Sequence[TensorSite], mix: str, facts: ModelFacts, options: MixOptions) -> None:
        self.mix, self.facts, self.options = mix, facts, options
        self.base = MIX_BASE_TYPES[mix]
        categories = [_category(site.name) for site in sites]
        self.n_attention_wv = sum(category in ATTN_V_LIKE for category in categories)
        self.tied = "output" not in categories
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.notes: list[str] = []
        self.patterns = [(re.compile(pattern), type_name(kind)) for pattern, kind in options.tensor_types]

    def layer_of(self, counter: int, name: str) -> tuple[int, int]:
        """``layer_info``: the counter for a dense model, the block number for a mixture of experts."""
        if self.facts.experts > 1:
            return _layer(name), self.facts.layers
        return counter, self.facts.layers

    def choose(self, site: TensorSite) -> str:
        """``llama_tensor_get_type``."""
        if not allows_quantization(site):
            return "F32"  # convert_hf_to_gguf.py writes norms and other 1-D tensors as F32; llama-quantize keeps them
        category = _category(site.name)
        options = self.options
        if options.token_embedding_type and category == "token_embd":
            return self.fits(site, type_name(options.token_embedding_type), "--token-embedding-type")
        if options.output_tensor_type and category == "output":
            return self.fits(site, type_name(options.output_tensor_type), "--output-tensor-type")
        chosen = self.base
        if self.base in UNQUANTIZED_TYPES:
            return chosen
        manual = next((kind for pattern, kind in self.patterns if pattern.search(site.name)), None)
        if manual is not None:
            chosen = manual
        elif not options.pure:
            chosen = self.rules(site, category, chosen)
        return self.fallback(site, chosen)

    def fits(self, site: TensorSite, chosen: str, option: str) -> str:
        """A type the user named for one tensor is used as it is (llama.cpp applies no fallback there)."""
        block = GGML_TYPES[chosen].block_size
        if site.shape[-1] % block:
            raise LowbitError(
                f"{option} {chosen} cannot hold {site.name}: its rows of {site.shape[-1]} are not a multiple of {block}"
            )
        return chosen

    def fallback(self, site: TensorSite, chosen: str) -> str:
        """``tensor_type_fallback``: a type whose block divides the row, with llama.cpp's warning."""
        row, block = site.shape[-1], GGML_TYPES[chosen].block_size
        if row % block == 0:
            return chosen
        result = TENSOR_TYPE_FALLBACK.get(chosen, chosen)
        unusual = row % GGML_TYPES[result].block_size != 0
        if unusual:
            result = "F16"
        self.notes.append(
            f"{site.name} - ncols {row} not divisible by {block} (required for type {chosen})"
            f"{' (must use F16 due to unusual shape)' if unusual else ''} -> falling back to {result}"
        )
        return result

    def rules(self, site: TensorSite, category: str, chosen: str) -> str:
        """``llama_tensor_get_type_impl`` for the mixes in :data:`MIX_BASE_TYPES`."""
        mix, facts, name = self.mix, self.facts, site.name
        if category == "output" or (self.tied and category == "token_embd"):
            if self.options.output_tensor_type:
                return type_name(self.options.output_tensor_type)
            if site.shape[-1] % GGML_TYPES[chosen].block_size:
                return "Q8_0"
            return chosen if chosen == "Q8_0" else "Q6_K"
        if category == "token_embd":
            return chosen  # untied embeddings: the mixes offered here keep the base type
        if category in ATTN_V_LIKE:
            i = self.i_attention_wv
            if mix == "Q2_K":
                chosen = "Q4_K" if facts.gqa >= 4 else "Q3_K"
            elif mix == "Q3_K_M":
                chosen = "Q5_K" if i < 2 else "Q4_K"
            elif mix == "Q3_K_L" or mix in ("IQ4_NL", "IQ4_XS") and facts.gqa >= 4:
                chosen = "Q5_K"
            elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, self.n_attention_wv):
                chosen = "Q6_K"
            elif mix == "Q4_K_S" and i < 4:
                chosen = "Q5_K"
            if facts.is_70b and chosen in ("Q3_K", "Q4_K"):
                chosen = "Q5_K"
            if facts.experts == 8:
                chosen = "Q8_0"
            self.i_attention_wv += 1
        elif category == "attn_k":
            if facts.experts == 8:
                chosen = "Q8_0"
        elif category == "ffn_down":
            layer, layers = self.layer_of(self.i_ffn_down, name)
            if mix == "Q2_K":
                chosen = "Q3_K"
            elif mix == "Q3_K_M":
                chosen = "Q5_K" if layer < layers // 16 else "Q4_K"
            elif mix == "Q3_K_L":
                chosen = "Q5_K"
            elif mix == "Q4_K_M":
                if use_more_bits(layer, layers):
                    chosen = "Q6_K"
            elif layer < layers // 8 and mix in ("IQ4_NL", "IQ4_XS") and not self.options.has_imatrix:
                chosen = "Q5_K"
            elif mix == "Q5_K_M" and use_more_bits(layer, layers):
                chosen = "Q6_K"
            elif mix == "Q4_K_S" and layer < layers // 8:
                chosen = "Q5_K"
            elif mix in ("Q4_0", "Q5_0") and self.options.has_imatrix and layer < layers // 8:
                chosen = "Q4_1" if mix == "Q4_0" else "Q5_1"
            self.i_ffn_down += 1
        elif category == "attn_output":
            if facts.experts == 8:
                if mix in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                    chosen = "Q5_K"
            elif mix == "Q2_K":
                chosen = "Q3_K"
            elif mix == "Q3_K_M":
                chosen = "Q4_K"
            elif mix == "Q3_K_L":
                chosen = "Q5_K"
        elif category == "ffn_gate":
            self.i_ffn_gate += 1
        elif category == "ffn_up":
            self.i_ffn_up += 1
        return chosen


def choose_types(
    sites: Sequence[TensorSite], mix: str, facts: ModelFacts, options: MixOptions = MixOptions()
) -> MixChoice:
    """The ggml type of every tensor of a model quantized as ``mix``, as ``llama-quantize`` picks it.

    ``sites`` are all the model's tensors as the GGUF file names them (norms included: llama.cpp
    counts them in its warning). The result's ``types`` follow the order of ``sites``.
    """
    mix = mix_name(mix)
    chooser = _Chooser(sites, mix, facts, options)
    chosen = {site.name: chooser.choose(site) for site in llama_cpp_order(sites)}
    return MixChoice({site.name: chosen[site.name] for site in sites}, chooser.notes)
