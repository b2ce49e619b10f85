"""Calibration text from every source a user has: a text file, a JSONL file of ``text`` fields
or of chats (``messages``, rendered by the model's chat template), a directory of text files;
and a clear error, with the numbers, when the text is shorter than the samples asked for."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.api import BUILTIN_CALIBRATION_SAMPLES, calibration_tokens
from lowbit.errors import LowbitError
from lowbit.sources import builtin_calibration_path, load_text, random_windows
from conftest import make_byte_tokenizer

#: a ChatML template (SmolLM2's and Qwen's shape)
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
)


@pytest.fixture
def chat_tokenizer():
    tokenizer = make_byte_tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


def _jsonl(path, *records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_chat_messages_are_rendered_with_the_chat_template(tmp_path, chat_tokenizer):
    path = _jsonl(
        tmp_path / "chats.jsonl",
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
        {"text": "plain text line"},
    )
    expected = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert load_text(path, chat_tokenizer) == expected + "\n\nplain text line"


def test_chat_tokens_are_those_of_the_rendered_text(tmp_path, chat_tokenizer):
    messages = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y" * 40}]
    path = _jsonl(tmp_path / "chats.jsonl", *[{"messages": messages}] * 3)
    tokens = calibration_tokens(chat_tokenizer, path, samples=2, length=50)
    rendered = chat_tokenizer(load_text(path, chat_tokenizer), add_special_tokens=False)["input_ids"]
    text = "".join(map(str, rendered))
    for window in tokens.tolist():  # every window is a stretch of the rendered text
        assert "".join(map(str, window)) in text


def test_chats_need_a_chat_template(tmp_path):
    path = _jsonl(tmp_path / "chats.jsonl", {"messages": [{"role": "user", "content": "Hi"}]})
    with pytest.raises(LowbitError, match=r"chats\.jsonl:1 is a chat .* no chat template"):
        load_text(path, make_byte_tokenizer())
    with pytest.raises(LowbitError, match="no chat template"):
        load_text(path)


@pytest.mark.parametrize(
    "record",
    [{"messages": []}, {"messages": "hi"}, {"messages": [{"role": "user"}]}, {"messages": [{"role": "user", "content": 3}]}, {"txt": "typo"}],
    ids=["empty", "string", "no-content", "content-not-text", "neither"],
)
def test_malformed_lines_name_the_line(tmp_path, chat_tokenizer, record):
    path = _jsonl(tmp_path / "bad.jsonl", {"text": "fine"}, record)
    with pytest.raises(LowbitError, match=r"bad\.jsonl:2 is not a JSON object with a string 'text' field or a 'messages' list"):
        load_text(path, chat_tokenizer)


def test_a_directory_of_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("not read")
    assert load_text(tmp_path) == "first\n\nsecond"


def test_short_text_says_how_many_tokens_were_found_and_needed(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("a" * 1000)  # 1000 byte tokens
    tokenizer = make_byte_tokenizer()
    assert calibration_tokens(tokenizer, path, samples=10, length=100).shape == (10, 100)  # exactly enough
    with pytest.raises(LowbitError) as error:
        calibration_tokens(tokenizer, path, samples=11, length=100)
    message = str(error.value)
    assert "has 1,000 tokens, shorter than 11 samples of 100 tokens (1,100 needed)" in message
    assert "--calibration-samples" in message and "--calibration-length" in message


def test_the_builtin_text_may_overlap():
    """The short built-in text draws its 16 windows with overlaps, as before; a user's file may not."""
    tokenizer = make_byte_tokenizer()
    n = len(tokenizer(builtin_calibration_path().read_text(), add_special_tokens=False)["input_ids"])
    length = n // 8
    tokens = calibration_tokens(tokenizer, builtin_calibration_path(), BUILTIN_CALIBRATION_SAMPLES, length, distinct=False)
    assert tokens.shape == (BUILTIN_CALIBRATION_SAMPLES, length)
    with pytest.raises(LowbitError, match=f"has {n:,} tokens"):
        calibration_tokens(tokenizer, builtin_calibration_path(), BUILTIN_CALIBRATION_SAMPLES, length)
    with pytest.raises(LowbitError, match="shorter than one sample of 10 tokens"):
        random_windows(torch.arange(9), 3, 10)


def test_quantize_refuses_short_calibration_before_quantizing(tiny_model_dir, tmp_path, capsys):
    from lowbit.cli import main

    path = tmp_path / "short.txt"
    path.write_text("tiny " * 20)
    status = main(["quantize", str(tiny_model_dir), "-s", "int4-g32+clip", "-o", str(tmp_path / "out"), "--calibration", str(path),
                   "--calibration-samples", "4", "--calibration-length", "64"])  # fmt: skip
    assert status == 2
    assert "error: the calibration text has 100 tokens, shorter than 4 samples of 64 tokens (256 needed)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quantize_with_chat_calibration(tiny_model_dir, tmp_path):
    """A chat JSONL calibrates through the public API with the model's own (templated) tokenizer."""
    tokenizer = make_byte_tokenizer()
    tokenizer.chat_template = CHATML
    path = _jsonl(tmp_path / "chats.jsonl", *[{"messages": [{"role": "user", "content": "What is a scale? " * 4}]}] * 4)
    model = lowbit.quantize(tiny_model_dir, "int4-g32+clip", calibration=path, calibration_samples=4, calibration_length=32,
                            tokenizer=tokenizer, progress=False)  # fmt: skip
    assert model.lowbit_manifest["calibration"] == {"samples": 4, "length": 32}
