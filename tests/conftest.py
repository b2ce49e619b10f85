"""Shared test setup: the tests directory on ``sys.path`` (for ``tiny_models``), and small
on-disk fixtures (a byte-level tokenizer, a saved tiny model, an evaluation text) that the
model-level tests share."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

#: English text for evaluation and calibration: 700+ bytes, i.e. 700+ byte-level tokens
EVAL_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Quantization maps each weight onto a small grid of values; the scale of each group "
    "is stored beside the codes, and the error it makes shows up in the logits. "
    "Perplexity measures how surprised a model is by text it has not seen before, and "
    "the divergence between two models says how far apart their predictions are. "
) * 2


def make_byte_tokenizer():
    """A real fast tokenizer built offline: byte-level, exactly 256 ids (no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    assert len(vocab) == 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, byte_tokenizer) -> Path:
    """A tiny random llama (tied embeddings) saved as a transformers directory with a tokenizer.
    Shared by several tests: never write into it."""
    from tiny_models import tiny_model

    directory = tmp_path_factory.mktemp("tiny-hf") / "tiny-llama"
    tiny_model("llama").save_pretrained(directory, safe_serialization=True)
    byte_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def eval_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(EVAL_TEXT)
    return path
