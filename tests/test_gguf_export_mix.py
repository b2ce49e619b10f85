"""llama-quantize's mixes (``lowbit/export/gguf_mix.py``): the type of every tensor.

The expected types are a table written out here by reading ``llama_tensor_get_type_impl``
(src/llama-quant.cpp, llama-cpp-python 0.3.36) for a Llama-3-8B-shaped model: 32 layers, 32
query heads over 8 key/value heads (grouped 4 to 1), every row a multiple of 256, untied
embeddings. ``use_more_bits`` picks layers 0-3, 28-31 and every third from 6 to 27. SmolLM2's
576-wide rows check the fallbacks (llama.cpp reports 180 of 272 tensors for Q2_K). The heavy
test asks ``llama-quantize --dry-run`` itself for every mix on a GGUF lowbit wrote.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.errors import LowbitError, UnknownNameError
from lowbit.export.gguf_mix import MIXES, MixOptions, ModelFacts, TensorSite, choose_types, use_more_bits

MORE_BITS_32 = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def llama_sites(layers: int, hidden: int, ffn: int, kv: int, vocab: int, tied: bool) -> list[TensorSite]:
    """The tensors of a Llama-shaped GGUF, in convert_hf_to_gguf.py's order."""
    sites = [TensorSite("token_embd.weight", (vocab, hidden))]
    for i in range(layers):
        sites += [
            TensorSite(f"blk.{i}.attn_norm.weight", (hidden,)),
            TensorSite(f"blk.{i}.attn_q.weight", (hidden, hidden)),
            TensorSite(f"blk.{i}.attn_k.weight", (kv, hidden)),
            TensorSite(f"blk.{i}.attn_v.weight", (kv, hidden)),
            TensorSite(f"blk.{i}.attn_output.weight", (hidden, hidden)),
            TensorSite(f"blk.{i}.ffn_norm.weight", (hidden,)),
            TensorSite(f"blk.{i}.ffn_gate.weight", (ffn, hidden)),
            TensorSite(f"blk.{i}.ffn_up.weight", (ffn, hidden)),
            TensorSite(f"blk.{i}.ffn_down.weight", (hidden, ffn)),
        ]
    sites.append(TensorSite("output_norm.weight", (hidden,)))
    if not tied:
        sites.append(TensorSite("output.weight", (vocab, hidden)))
    return sites


LLAMA3_8B = llama_sites(32, 4096, 14336, 1024, 128256, tied=False)
LLAMA3_8B_FACTS = ModelFacts(layers=32, heads=32, kv_heads=8)
SMOLLM2 = llama_sites(30, 576, 1536, 192, 49152, tied=True)
SMOLLM2_FACTS = ModelFacts(layers=30, heads=9, kv_heads=3)


def expected_llama3_8b(mix: str, kind: str, layer: int, imatrix: bool = False) -> str:
    """The type llama.cpp gives a linear of kind ``kind`` in ``layer`` of Llama-3-8B (read off its code)."""
    more = layer in MORE_BITS_32
    table = {
        "Q4_K_M": {"attn_v": "Q6_K" if more else "Q4_K", "ffn_down": "Q6_K" if more else "Q4_K"},
        "Q5_K_M": {"attn_v": "Q6_K" if more else "Q5_K", "ffn_down": "Q6_K" if more else "Q5_K"},
        "Q4_K_S": {"attn_v": "Q5_K" if layer < 4 else "Q4_K", "ffn_down": "Q5_K" if layer < 4 else "Q4_K"},
        "Q3_K_M": {"attn_v": "Q5_K" if layer < 2 else "Q4_K", "ffn_down": "Q5_K" if layer < 2 else "Q4_K",
                   "attn_output": "Q4_K"},
        "Q3_K_L": {"attn_v": "Q5_K", "ffn_down": "Q5_K", "attn_output": "Q5_K"},
        "Q2_K": {"attn_v": "Q4_K", "ffn_down": "Q3_K", "attn_output": "Q3_K"},  # attn_v: 4 query heads per kv head
        "IQ4_XS": {"attn_v": "Q5_K", "ffn_down": "Q5_K" if layer < 4 and not imatrix else "IQ4_XS"},
        "IQ4_NL": {"attn_v": "Q5_K", "ffn_down": "Q5_K" if layer < 4 and not imatrix else "IQ4_NL"},
        "Q4_0": {"ffn_down": "Q4_1" if layer < 4 and imatrix else "Q4_0"},
        "Q5_0": {"ffn_down": "Q5_1" if layer < 4 and imatrix else "Q5_0"},
    }  # fmt: skip
    base = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q4_K_S": "Q4_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
            "Q3_K_S": "Q3_K", "Q5_K_S": "Q5_K"}.get(mix, mix)  # fmt: skip
    return table.get(mix, {}).get(kind, base)


@pytest.mark.parametrize("mix", [m for m in MIXES if m not in ("F32", "F16", "BF16")])
@pytest.mark.parametrize("imatrix", [False, True])
def test_every_mix_matches_llama_cpp_on_a_llama3_8b_shape(mix, imatrix):
    choice = choose_types(LLAMA3_8B, mix, LLAMA3_8B_FACTS, MixOptions(has_imatrix=imatrix))
    base = expected_llama3_8b(mix, "token_embd", 0)
    assert choice.types["token_embd.weight"] == base  # untied: the base type
    assert choice.types["output.weight"] == ("Q8_0" if mix == "Q8_0" else "Q6_K")
    assert choice.types["output_norm.weight"] == "F32"
    for layer in range(32):
        assert choice.types[f"blk.{layer}.attn_norm.weight"] == "F32"
        for kind in LINEARS:
            assert choice.types[f"blk.{layer}.{kind}.weight"] == expected_llama3_8b(mix, kind, layer, imatrix), (kind, layer)
    assert choice.notes == []


def test_use_more_bits_layers():
    assert [i for i in range(32) if use_more_bits(i, 32)] == MORE_BITS_32


@pytest.mark.parametrize("mix", ["F32", "F16", "BF16"])
def test_float_mixes_keep_norms_f32(mix):
    types = choose_types(LLAMA3_8B, mix, LLAMA3_8B_FACTS).types
    assert {t for n, t in types.items() if "norm" in n} == {"F32"}
    assert {t for n, t in types.items() if "norm" not in n} == {mix}


def test_a_70b_shape_gets_q5_k_attn_v():
    sites = llama_sites(80, 8192, 28672, 1024, 128256, tied=False)
    types = choose_types(sites, "Q4_K_M", ModelFacts(80, 64, 8)).types
    assert types["blk.0.attn_v.weight"] == "Q6_K"  # use_more_bits
    assert types["blk.11.attn_v.weight"] == "Q5_K"  # Q4_K promoted: llama.cpp's LLM_TYPE_70B
    assert types["blk.11.attn_q.weight"] == "Q4_K"


def test_eight_experts_bump_attention():
    types = choose_types(LLAMA3_8B, "Q4_K_M", ModelFacts(32, 32, 8, experts=8)).types
    assert types["blk.5.attn_v.weight"] == types["blk.5.attn_k.weight"] == "Q8_0"
    assert types["blk.5.attn_output.weight"] == "Q5_K"


def test_smollm2_falls_back_as_llama_cpp_reports():
    choice = choose_types(SMOLLM2, "Q2_K", SMOLLM2_FACTS)
    assert choice.summary() == "180 of 272 tensor(s) required fallback quantization"  # llama-quantize's own count
    assert choice.notes[0] == "blk.0.attn_k.weight - ncols 576 not divisible by 256 (required for type Q2_K) -> falling back to Q4_0"
    types = choose_types(SMOLLM2, "Q4_K_M", SMOLLM2_FACTS).types
    assert types["token_embd.weight"] == "Q8_0"  # tied: the output rule, rows of 576 not a multiple of 256
    assert types["blk.5.attn_q.weight"] == "Q5_0"  # Q4_K -> Q5_0
    assert types["blk.0.attn_v.weight"] == "Q8_0"  # Q6_K (use_more_bits) -> Q8_0
    assert types["blk.4.attn_v.weight"] == "Q5_0"  # Q4_K (layer 4 of 30 is not one of the more-bits layers)
    assert types["blk.4.ffn_down.weight"] == "Q4_K"  # rows of 1536 = 6 x 256
    assert types["blk.0.ffn_down.weight"] == "Q6_K"
    iq4 = choose_types(SMOLLM2, "IQ4_XS", SMOLLM2_FACTS).types
    assert iq4["blk.9.attn_q.weight"] == "IQ4_NL" and iq4["blk.0.ffn_down.weight"] == "Q5_K"


def test_rows_no_block_divides_become_f16():
    sites = [TensorSite("blk.0.ffn_down.weight", (96, 200)), TensorSite("output.weight", (64, 200))]
    choice = choose_types(sites, "Q4_K_M", ModelFacts(1, 4, 4))
    assert choice.types == {"blk.0.ffn_down.weight": "F16", "output.weight": "F16"}
    assert "must use F16 due to unusual shape" in choice.notes[0]


def test_llama_quantize_options():
    facts = LLAMA3_8B_FACTS
    pure = choose_types(LLAMA3_8B, "Q4_K_M", facts, MixOptions(pure=True)).types
    assert {t for n, t in pure.items() if "norm" not in n} == {"Q4_K"}  # --pure: output too
    chosen = choose_types(LLAMA3_8B, "Q4_K_M", facts, MixOptions(output_tensor_type="q8_0", token_embedding_type="Q4_0")).types
    assert chosen["output.weight"] == "Q8_0" and chosen["token_embd.weight"] == "Q4_0"
    rules = MixOptions(tensor_types=((r"blk\.1\.attn_v", "Q8_0"), ("attn_v", "Q5_K"), ("ffn_down", "q2_k")))
    types = choose_types(LLAMA3_8B, "Q4_K_M", facts, rules).types
    assert types["blk.1.attn_v.weight"] == "Q8_0"  # the first pattern found wins
    assert types["blk.0.attn_v.weight"] == "Q5_K" and types["blk.0.ffn_down.weight"] == "Q2_K"
    assert types["blk.0.attn_q.weight"] == "Q4_K"


def test_bad_options_are_clear_errors():
    with pytest.raises(UnknownNameError, match="unknown GGUF type 'Q4_K_X'"):
        choose_types(LLAMA3_8B, "Q4_K_X", LLAMA3_8B_FACTS)
    with pytest.raises(UnknownNameError, match="unknown ggml tensor type 'Q9_0'"):
        choose_types(LLAMA3_8B, "Q4_K_M", LLAMA3_8B_FACTS, MixOptions(output_tensor_type="Q9_0"))
    with pytest.raises(LowbitError, match="not a regular expression"):
        MixOptions(tensor_types=(("attn_(v", "Q8_0"),))
    with pytest.raises(LowbitError, match="--token-embedding-type Q4_K cannot hold token_embd.weight"):
        choose_types(SMOLLM2, "Q4_K_M", SMOLLM2_FACTS, MixOptions(token_embedding_type="Q4_K"))


# -- llama.cpp itself -------------------------------------------------------------------------

DRY_RUN_LINE = re.compile(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\S+), size = [^(\n]*(?:\((\S+)\))?")


def llama_quantize() -> Path:
    folder = subprocess.run(["bash", "scripts/llama_cpp_tools.sh"], capture_output=True, text=True, check=True).stdout
    return Path(folder.strip()) / "llama-quantize"


@pytest.mark.heavy
@pytest.mark.parametrize("shape", ["aligned", "smollm2-like"])
def test_llama_quantize_dry_run_picks_the_same_types(tmp_path, shape):
    """``llama-quantize --dry-run`` on an F32 GGUF lowbit wrote: every tensor's type, every mix."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_gguf_export import byte_fallback_tokenizer
    from tiny_models import tiny_model

    from lowbit.export.gguf import GgufOptions, write_gguf
    from lowbit.export.gguf_mix import ModelFacts as Facts

    dims = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=16, num_attention_heads=8,
                num_key_value_heads=2, head_dim=32) if shape == "aligned" else \
           dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64)  # fmt: skip
    model = tiny_model("llama", vocab_size=320, **dims)
    model.save_pretrained(tmp_path)
    byte_fallback_tokenizer().save_pretrained(tmp_path)
    source = tmp_path / "f32.gguf"
    write_gguf(model, source, GgufOptions("F32"), tokenizer_source=tmp_path, progress=False)
    from gguf import GGUFReader

    sites = [TensorSite(t.name, tuple(int(n) for n in reversed(t.shape))) for t in GGUFReader(source).tensors]
    facts = Facts(dims["num_hidden_layers"], dims["num_attention_heads"], dims["num_key_value_heads"])
    tool = llama_quantize()
    for mix in [m for m in MIXES if m not in ("F32",)]:
        run = subprocess.run([str(tool), "--dry-run", str(source), mix], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        theirs = {}
        for name, current, new in DRY_RUN_LINE.findall(run.stdout + run.stderr):
            theirs[name] = (new or current).upper()
        ours = choose_types(sites, mix, facts).types
        assert theirs == ours, mix
