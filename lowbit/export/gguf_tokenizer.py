"""The tokenizer part of a GGUF file's metadata (``tokenizer.*``), from a GGUF file or a HF tokenizer.

Interface (what the GGUF writer calls)::

    entries = tokenizer_metadata(source, vocab_size=None)   # -> list[MetadataEntry]
    add_tokenizer(writer, source, vocab_size=None)          # the same entries, added to a gguf.GGUFWriter

``source`` is what lowbit loaded the model from: a GGUF file (or a directory holding one, or
the name ``smollm2-135m``), a HF or lowbit directory with tokenizer files, or a loaded
transformers tokenizer. ``vocab_size`` is the number of rows of the model's embedding (default:
``vocab_size`` of the directory's ``config.json``); a vocabulary shorter than that is padded with
``[PAD<i>]`` tokens of type UNUSED, as llama.cpp's converter does, because llama.cpp refuses a
vocabulary that does not match the embedding. Each :class:`MetadataEntry` is ``(key, value,
type, item_type)`` in gguf-py's terms; ``entry.add_to(writer)`` adds it.

Where the keys come from:

- **a GGUF source**: every ``tokenizer.*`` key of the file, copied exactly (same value types,
  token strings as raw bytes). This is lowbit's default model's case (SmolLM2 ships as GGUF).
- **a HF tokenizer** (``tokenizer.model`` and/or ``tokenizer.json`` + ``tokenizer_config.json``),
  converted as llama.cpp's ``convert_hf_to_gguf.py`` does, in the same order of preference:

  * ``tokenizer.model`` (sentencepiece: Llama 1/2, Mistral, Gemma, Phi-3): model ``llama``,
    pre ``default``, each piece with its score and type (normal, unknown, control, unused,
    byte); added tokens are control when special, else user-defined with score -1000.
  * ``tokenizer.json`` holding a BPE with byte fallback (the same tokenizers saved without
    their ``tokenizer.model``, as transformers 5 saves them): model ``llama``; the scores that
    llama.cpp's sentencepiece tokenizer merges by are rebuilt from the merges (a token's score
    is minus the rank of the first merge that makes it; gguf-py's ``LlamaHfVocab`` writes -1000
    for every token, which loses the merge order).
  * ``tokenizer.json`` holding a byte-level BPE (GPT-2 style: Llama 3, SmolLM, Qwen2/3, ...):
    model ``gpt2`` with its merges, and ``tokenizer.ggml.pre`` chosen as llama.cpp's
    ``get_vocab_base_pre`` does: the tokenizer encodes a fixed text and the SHA-256 of the ids
    names the pre-tokenizer (:data:`PRE_TOKENIZER_HASHES`, the entries of llama.cpp's table for
    the families lowbit supports). An unknown hash is an error naming them: writing a wrong
    pre-tokenizer would make llama.cpp split text differently from the model's own tokenizer.

  Special token ids, ``add_*_token`` flags read from the files and the chat template come from
  gguf-py's ``SpecialVocab``; ``add_bos_token`` / ``add_eos_token`` are then set from what the
  HF tokenizer actually does when it encodes a word, so llama.cpp adds exactly the same
  special tokens (its own default would otherwise apply where the files say nothing).

Why not gguf-py's ``BpeVocab`` / ``LlamaHfVocab`` / ``SentencePieceVocab`` directly: they do not
pad to the embedding's size, do not mark special added tokens of a byte-level vocabulary as
control, and ``LlamaHfVocab`` loses the scores (above). ``SpecialVocab`` and ``GGUFWriter``'s
key names are used as they are.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from lowbit.errors import LowbitError

#: the text llama.cpp's ``get_vocab_base_pre`` encodes; the SHA-256 of ``str(ids)`` names the pre-tokenizer
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

#: llama.cpp's ``get_vocab_base_pre`` table (llama-cpp-python 0.3.36's llama.cpp), the entries for
#: the families lowbit converts: hash of the check text's ids -> ``tokenizer.ggml.pre``
PRE_TOKENIZER_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",  # Llama-4-Scout
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 .. Qwen3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",  # Qwen3.5
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",  # microsoft/phi-2
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # starcoder2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # also mpt's hash
}

#: the names of files that hold a HF tokenizer
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
#: sentencepiece token types, as llama.cpp numbers them (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
ADDED_TOKEN_SCORE = -1000.0
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
#: added tokens llama.cpp's converter marks control even when the tokenizer does not call them special
LOOKS_SPECIAL = re.compile(r"^(<\|.*\|>|<｜.*｜>|<unused.*>|<pad>|<mask>|<2mass>|\[@BOS@\])$", re.DOTALL)
#: architectures whose sentencepiece tokenizer prepends no space (llama.cpp's converter says so for them)
NO_SPACE_PREFIX = ("gemma", "gemma2", "gemma3")
#: special tokens whose ids a GGUF file records
SPECIAL_TOKEN_KINDS = ("bos", "eos", "unk", "sep", "pad")


@dataclass(frozen=True)
class MetadataEntry:
    """One GGUF key: ``value`` of ``type`` (a ``gguf.GGUFValueType``); arrays name ``item_type``."""

    key: str
    value: object
    type: object
    item_type: object = None

    def add_to(self, writer) -> None:
        writer.add_key_value(self.key, self.value, self.type, sub_type=self.item_type)


def add_tokenizer(writer, source, vocab_size: int | None = None) -> list[MetadataEntry]:
    """Add the tokenizer keys of ``source`` (see :func:`tokenizer_metadata`) to a ``GGUFWriter``."""
    entries = tokenizer_metadata(source, vocab_size)
    for entry in entries:
        entry.add_to(writer)
    return entries


def tokenizer_metadata(source, vocab_size: int | None = None) -> list[MetadataEntry]:
    """The ``tokenizer.*`` keys for a GGUF file of the model loaded from ``source``.

    ``source``: a GGUF file (its keys are copied), a directory with HF tokenizer files, a
    model spec lowbit resolves (``smollm2-135m``, a directory holding one GGUF file), or a
    loaded transformers tokenizer. ``vocab_size``: the embedding's rows (see the module doc).
    """
    if hasattr(source, "save_pretrained"):  # a loaded tokenizer: convert what it saves
        with tempfile.TemporaryDirectory(prefix="lowbit-tokenizer-") as directory:
            source.save_pretrained(directory)
            return _from_hf_directory(Path(directory), vocab_size)
    path = Path(str(source)).expanduser()
    if path.is_dir() and any((path / name).is_file() for name in HF_TOKENIZER_FILES):
        return _from_hf_directory(path, vocab_size)
    from lowbit.sources import resolve_model

    resolved = resolve_model(source)
    if resolved.gguf_file:
        entries = _from_gguf(Path(resolved.path) / resolved.gguf_file)
        count = len(next(e.value for e in entries if e.key == "tokenizer.ggml.tokens"))
        if vocab_size is not None and vocab_size != count:
            raise LowbitError(
                f"{resolved} holds {count} tokens but the model's embedding has {vocab_size} rows; "
                "the tokenizer does not belong to this model"
            )
        return entries
    raise LowbitError(f"{resolved} has no tokenizer files ({', '.join(HF_TOKENIZER_FILES)}); save the tokenizer beside the model")


# -- from a GGUF file ---------------------------------------------------------------------


def _from_gguf(path: Path) -> list[MetadataEntry]:
    """Every ``tokenizer.*`` key of a GGUF file, with its types; strings as the file's bytes."""
    entries = [entry for entry in read_metadata(path) if entry.key.startswith("tokenizer.")]
    if not any(entry.key == "tokenizer.ggml.tokens" for entry in entries):
        raise LowbitError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens); give the model's HF directory instead")
    return entries


def read_metadata(path: str | os.PathLike) -> list[MetadataEntry]:
    """Every key of a GGUF file's metadata, in file order: strings as bytes, numeric arrays as lists.

    The header is first walked by lowbit's bounded reader (``sources.check_gguf``: counts, lengths
    and tensors checked against the file), then decoded here; gguf-py's ``GGUFReader`` would do it
    too, but takes seconds for a 50,000-token vocabulary (a numpy view per string)."""
    import mmap

    import numpy as np
    from gguf import GGUFValueType

    from lowbit.sources import check_gguf

    path = Path(path)
    check_gguf(path)
    numeric = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8", 11: "i8", 12: "f8"}
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        position = 24

        def take(count: int) -> bytes:
            nonlocal position
            position += count
            return data[position - count : position]

        def string() -> bytes:
            return take(int.from_bytes(take(8), "little"))

        def scalar(kind: int):
            if kind == GGUFValueType.STRING:
                return string()
            dtype = np.dtype(numeric[kind]).newbyteorder("<")
            return np.frombuffer(take(dtype.itemsize), dtype)[0].item()

        entries = []
        for _ in range(int.from_bytes(data[16:24], "little")):
            key = string().decode("utf-8", errors="replace")
            kind = GGUFValueType(int.from_bytes(take(4), "little"))
            if kind != GGUFValueType.ARRAY:
                entries.append(MetadataEntry(key, scalar(kind), kind))
                continue
            item = GGUFValueType(int.from_bytes(take(4), "little"))
            length = int.from_bytes(take(8), "little")
            if item == GGUFValueType.ARRAY:
                raise LowbitError(f"{path}: key {key!r} is an array of arrays; lowbit reads flat arrays only")
            if item == GGUFValueType.STRING:
                values = [string() for _ in range(length)]
            else:
                dtype = np.dtype(numeric[item]).newbyteorder("<")
                values = np.frombuffer(take(length * dtype.itemsize), dtype).tolist()
            entries.append(MetadataEntry(key, values, kind, item))
    return entries


# -- from a HF tokenizer ------------------------------------------------------------------


def _from_hf_directory(directory: Path, vocab_size: int | None) -> list[MetadataEntry]:
    from gguf import SpecialVocab

    tokenizer = _load_hf_tokenizer(directory)
    config = _read_json(directory / "config.json")
    if vocab_size is None:
        vocab_size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    spec = _read_json(directory / "tokenizer.json")
    model = spec.get("model", {})
    bpe = model.get("type") == "BPE"
    if (directory / "tokenizer.model").is_file():
        fill = _sentencepiece_vocab(directory, tokenizer, vocab_size)
    elif bpe and model.get("byte_fallback"):
        fill = _byte_fallback_vocab(tokenizer, model, vocab_size)
    elif bpe and (spec.get("decoder") or {}).get("type") == "ByteLevel":
        fill = _byte_level_vocab(tokenizer, vocab_size)
    else:
        kind = model.get("type") or "none"
        raise LowbitError(
            f"cannot convert the tokenizer in {directory} to GGUF: lowbit converts sentencepiece (tokenizer.model), "
            f"BPE with byte fallback and byte-level BPE tokenizers; this one is {kind!r}"
        )

    def fill_all(writer) -> None:
        count = fill(writer)
        prefix = _read_json(directory / "tokenizer_config.json").get("add_prefix_space")
        if config.get("model_type") in NO_SPACE_PREFIX:
            prefix = False
        if isinstance(prefix, bool):
            writer.add_add_space_prefix(prefix)
        special = SpecialVocab(directory, load_merges=not model.get("byte_fallback") and bpe, n_vocab=count)
        for kind in SPECIAL_TOKEN_KINDS:  # what the files did not say, the loaded tokenizer knows
            index = getattr(tokenizer, f"{kind}_token_id", None)
            if kind not in special.special_token_ids and isinstance(index, int) and 0 <= index < count:
                special.special_token_ids[kind] = index
        special.add_special_token["bos"], special.add_special_token["eos"] = adds_special_tokens(tokenizer)
        special.add_to_gguf(writer, quiet=True)

    return _collect(fill_all)


def _load_hf_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise LowbitError(f"cannot load the tokenizer in {directory} ({type(error).__name__}: {error})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LowbitError(f"cannot read {path} ({error}); the file may be truncated or corrupt") from None
    return data if isinstance(data, dict) else {}


def _collect(fill: Callable[[object], None]) -> list[MetadataEntry]:
    """Run ``fill`` on a gguf-py writer that writes nothing and return the tokenizer keys it set,
    so gguf-py's key names and value types are used as they are."""
    from gguf import GGUFValueType, GGUFWriter

    writer = GGUFWriter(None, "none")
    fill(writer)
    entries = []
    for key, value in writer.kv_data[0].items():
        if key.startswith("tokenizer."):
            item = value.sub_type
            if value.type == GGUFValueType.ARRAY and item is None:  # what gguf-py would infer when packing
                item = GGUFValueType.get_type(value.value[0])
            entries.append(MetadataEntry(key, value.value, value.type, item))
    return entries


def _padded_size(vocab_size: int | None, highest_id: int) -> int:
    if vocab_size is None:
        return highest_id + 1
    if highest_id >= vocab_size:
        raise LowbitError(
            f"the tokenizer has token id {highest_id} but the model's embedding has {vocab_size} rows; "
            "the tokenizer does not belong to this model"
        )
    return vocab_size


def _added_tokens(tokenizer) -> dict[int, object]:
    """id -> AddedToken, for the tokens added on top of the model's vocabulary."""
    return dict(tokenizer.added_tokens_decoder)


def _added_token_type(token) -> int:
    return CONTROL if token.special or LOOKS_SPECIAL.match(token.content) else USER_DEFINED


def _byte_level_vocab(tokenizer, vocab_size: int | None) -> Callable[[object], int]:
    """GPT-2 style BPE: tokens as the vocabulary spells them, merges by SpecialVocab, pre by hash."""
    pre = pre_tokenizer_name(tokenizer)
    vocab = tokenizer.get_vocab()
    size = _padded_size(vocab_size, max(vocab.values()))
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, index in vocab.items():
        tokens[index], types[index] = text, NORMAL
    for index, token in _added_tokens(tokenizer).items():
        text = token.content
        if not token.normalized:  # llama.cpp matches added tokens in normalized text
            text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
        tokens[index], types[index] = text, _added_token_type(token)

    def fill(writer) -> int:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        return size

    return fill


def pre_tokenizer_name(tokenizer) -> str:
    """``tokenizer.ggml.pre`` for a byte-level BPE tokenizer, as llama.cpp's converter picks it."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZER_HASHES:
        known = ", ".join(sorted(set(PRE_TOKENIZER_HASHES.values())))
        raise LowbitError(
            f"unknown BPE pre-tokenizer (check-text hash {digest[:16]}...): lowbit knows the pre-tokenizers of "
            f"{known} (llama.cpp's table); a wrong guess would make llama.cpp split text unlike the model's tokenizer"
        )
    return PRE_TOKENIZER_HASHES[digest]


def _sentencepiece_vocab(directory: Path, tokenizer, vocab_size: int | None) -> Callable[[object], int]:
    """A ``tokenizer.model``: pieces, scores and types from sentencepiece, then the added tokens."""
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(directory / "tokenizer.model"))
    added = _added_tokens(tokenizer)
    size = _padded_size(vocab_size, max([processor.vocab_size() - 1, *added]))
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-10000.0] * size
    types = [UNUSED] * size
    for index in range(processor.vocab_size()):
        tokens[index], scores[index] = processor.IdToPiece(index), processor.GetScore(index)
        if processor.IsUnknown(index):
            types[index] = UNKNOWN
        elif processor.IsControl(index):
            types[index] = CONTROL
        elif processor.IsUnused(index):
            types[index] = UNUSED
        elif processor.IsByte(index):
            types[index] = BYTE
        else:
            types[index] = NORMAL
    _put_added(tokens, scores, types, added, skip_below=processor.vocab_size())
    return _llama_fill(tokens, scores, types)


def _put_added(tokens, scores, types, added: dict, skip_below: int) -> None:
    """Added tokens (ids at or above ``skip_below``, or specials re-declared below it) as llama.cpp's converter writes them."""
    for index, token in added.items():
        if index < skip_below and types[index] in (UNKNOWN, CONTROL, BYTE) and tokens[index] == token.content:
            continue  # the model's own special piece, already typed
        kind = _added_token_type(token)
        text = token.content if kind == CONTROL else token.content.replace("\u2581", " ")
        tokens[index], scores[index], types[index] = text, ADDED_TOKEN_SCORE, kind


def _byte_fallback_vocab(tokenizer, model: dict, vocab_size: int | None) -> Callable[[object], int]:
    """A sentencepiece-style BPE saved as ``tokenizer.json`` only: scores rebuilt from the merges."""
    vocab = model["vocab"]
    added = _added_tokens(tokenizer)
    size = _padded_size(vocab_size, max([*vocab.values(), *added]))
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-10000.0] * size
    types = [UNUSED] * size
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    rank = {}
    for position, (left, right) in enumerate(merges):
        rank.setdefault(left + right, position)
    unknown = model.get("unk_token") or tokenizer.unk_token
    for text, index in vocab.items():
        tokens[index] = text
        if text in rank:
            scores[index], types[index] = -float(rank[text]), NORMAL
        elif BYTE_TOKEN.fullmatch(text):
            scores[index], types[index] = 0.0, BYTE
        elif text == unknown:
            scores[index], types[index] = 0.0, UNKNOWN
        else:  # a single character, or a piece no merge makes: never merged into
            scores[index], types[index] = (0.0 if len(text) == 1 else -float(len(merges) + 1)), NORMAL
    _put_added(tokens, scores, types, added, skip_below=0)
    if unknown in vocab:  # the unknown piece stays UNKNOWN even when it is declared as an added special token
        index = vocab[unknown]
        tokens[index], scores[index], types[index] = unknown, 0.0, UNKNOWN
    return _llama_fill(tokens, scores, types)


def _llama_fill(tokens, scores, types) -> Callable[[object], int]:
    def fill(writer) -> int:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        return len(tokens)

    return fill


def adds_special_tokens(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer puts its BOS first / its EOS last when it encodes plain text."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    extra = len(full) - len(bare)
    add_bos = extra > 0 and bos is not None and full[0] == bos and full[1 : 1 + len(bare)] == bare
    add_eos = extra > 0 and eos is not None and full[-1] == eos and full[-1 - len(bare) : -1] == bare
    return add_bos, add_eos
