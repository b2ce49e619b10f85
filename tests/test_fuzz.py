"""Seeded byte mutations of a small valid GGUF and a small valid safetensors checkpoint (issue 11).

Each mutant goes through ``lowbit inspect`` and (every few) ``lowbit quantize``, in one
subprocess whose address space is limited to 1 GiB beyond what its imports mapped, with a
time limit per command. Every command must succeed or end in one ``error:`` line with exit
status 2: no crash, no traceback, no "internal error", no hang, no runaway memory.

CI runs a few hundred mutants of each; the heavy run (``python3 -m pytest tests/test_fuzz.py
-m heavy``) runs thousands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from crafted_files import write_tiny_directory, write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent

RUNNER = """
import json, os, random, resource, shutil, signal, sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from lowbit.cli import main
import lowbit.sources, lowbit.export.native, transformers, gguf  # everything a load needs, before the limit

kind, original, work, count, seed, quantize_every = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), *map(int, sys.argv[4:7])
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))

def too_slow(signum, frame):
    raise TimeoutError("hang")

signal.signal(signal.SIGALRM, too_slow)
good = original.read_bytes() if kind == "gguf" else (original / "model.safetensors").read_bytes()

def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    choice = rng.random()
    header = min(len(data), 4096 if kind == "gguf" else 8 + int.from_bytes(data[:8], "little"))
    if choice < 0.45:  # flip bytes, mostly in the header
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(header) if rng.random() < 0.8 else rng.randrange(len(data))
            data[position] = rng.randrange(256)
    elif choice < 0.65:  # an extreme integer where one was
        position = rng.randrange(max(1, header - 8))
        data[position : position + 8] = rng.choice([0, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1]).to_bytes(8, "little")
    elif choice < 0.8:  # cut short
        del data[rng.randrange(len(data)) :]
    elif choice < 0.9:  # bytes inserted or removed inside the header
        position = rng.randrange(header)
        if rng.random() < 0.5:
            data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            del data[position : position + rng.randint(1, 16)]
    else:  # a digit of the JSON header or a length changed
        digits = [i for i in range(min(header, len(data))) if 48 <= data[i] <= 57]
        if digits:
            data[rng.choice(digits)] = rng.choice(b"0123456789-")
    return bytes(data)

failures, outcomes = [], {0: 0, 2: 0}
rng = random.Random(seed)
for number in range(count):
    target = work / f"m{number % 4}"
    shutil.rmtree(target, ignore_errors=True)
    if kind == "gguf":
        target.mkdir()
        path = target / "model.gguf"
    else:
        shutil.copytree(original, target)
        path = target / "model.safetensors"
    path.write_bytes(mutate(good, rng))
    model = str(path if kind == "gguf" else target)
    commands = [["inspect", model]]
    if number % quantize_every == 0:
        commands.append(["quantize", model, "-o", str(work / "out"), "--overwrite", "--scheme", "int8"])
    for argv in commands:
        err, out = StringIO(), StringIO()
        signal.alarm(30)
        try:
            with redirect_stderr(err), redirect_stdout(out):
                code = main(argv)
        except BaseException as error:  # a hang (alarm) or anything main let through
            code = f"{type(error).__name__}: {error}"
        finally:
            signal.alarm(0)
        text = err.getvalue()
        bad = code not in (0, 2) or "Traceback" in text or "internal error" in text or (code == 2 and text.count("error:") != 1)
        if bad:
            failures.append({"mutant": number, "argv": argv[0], "code": str(code), "stderr": text[-600:]})
        else:
            outcomes[code] += 1
print(json.dumps({"failures": failures[:10], "failed": len(failures), "outcomes": outcomes}))
"""


def fuzz(kind: str, original: Path, work: Path, count: int, seed: int, quantize_every: int) -> dict:
    env = {**os.environ, "LOWBIT_CACHE": str(work / "cache"), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, kind, str(original), str(work), str(count), str(seed), str(quantize_every)],
        capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def originals(tmp_path_factory, byte_tokenizer) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("fuzz-originals")
    return write_tiny_gguf(base / "tiny.gguf"), write_tiny_directory(base / "tiny", byte_tokenizer)


def check(result: dict) -> None:
    assert result["failed"] == 0, json.dumps(result["failures"], indent=1)
    assert result["outcomes"]["2"] > 0  # the mutations do damage: many are refused


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_fuzz(kind, originals, tmp_path):
    original = originals[0] if kind == "gguf" else originals[1]
    check(fuzz(kind, original, tmp_path, count=300, seed=11, quantize_every=6))


@pytest.mark.heavy
@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fuzz_heavy(kind, seed, originals, tmp_path):
    original = originals[0] if kind == "gguf" else originals[1]
    check(fuzz(kind, original, tmp_path, count=2500, seed=seed, quantize_every=5))
