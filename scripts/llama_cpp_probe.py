"""Ask llama.cpp itself (llama-cpp-python) about a GGUF file; run by the venv of scripts/llama_cpp_python.sh.

    PYTHON=$(bash scripts/llama_cpp_python.sh)
    $PYTHON scripts/llama_cpp_probe.py request.json > answer.json

The request is JSON: ``model`` (a .gguf path), ``texts`` (strings to tokenize, special tokens
parsed), ``prompt`` (a string whose logits are wanted at every position), ``generate`` (a prompt
continued greedily for ``max_tokens``). The answer is JSON: ``tokens`` (one id list per text),
``prompt_tokens``, ``logits`` (positions x vocabulary, float32 as a nested list) and ``text``.
It runs in a separate interpreter so the checkout's own environment needs no llama.cpp build.
"""

from __future__ import annotations

import json
import sys

from llama_cpp import Llama


def main() -> None:
    request = json.load(open(sys.argv[1]))
    llm = Llama(model_path=request["model"], n_ctx=512, logits_all=True, n_threads=2, verbose=False, seed=0)
    answer = {"tokens": [llm.tokenize(text.encode(), add_bos=False, special=True) for text in request.get("texts", [])]}
    if "prompt" in request:
        tokens = llm.tokenize(request["prompt"].encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(tokens)
        answer["prompt_tokens"] = tokens
        answer["logits"] = llm.scores[: len(tokens)].tolist()
    if "generate" in request:
        llm.reset()
        out = llm.create_completion(request["generate"], max_tokens=request.get("max_tokens", 24), temperature=0.0, top_k=1)
        answer["text"] = out["choices"][0]["text"]
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
