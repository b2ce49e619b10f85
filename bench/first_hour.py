"""The first hour on the default model, measured: what a newcomer waits for and what they get.

    python bench/first_hour.py [--skip-demo]

- demo wall time (``lowbit compare`` with its defaults, what ``scripts/demo.sh`` runs after setup);
- time to first output of each command on its second run (quantize, eval, compare, size,
  inspect, generate on smollm2-135m): seconds from start until the first line appears;
- CPU greedy generation, ms per new token (prompt included), float vs int4-g128 vs nf4-dq,
  through ``lowbit.generate`` (which runs under ``dense_cache``);
- the default model's sizes: the source GGUF file, the reference in memory (float32), and each
  scheme's output directory on disk (kept tensors stored in 16 bits, the default, and int4-g128
  with ``--keep-dtype fp32``).

Prints a table and writes ``bench/results/first-hour-cpu-<date>.json``. The 1-minute load
average before and after says whether the cores were shared with other work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"


def load_average() -> float:
    return os.getloadavg()[0]


def timed(command: list[str]) -> dict:
    """Run ``python -m lowbit COMMAND``; seconds to its first line of output and to its end."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "lowbit", *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO
    )
    first = None
    output = []
    for line in iter(process.stdout.readline, b""):
        if first is None:
            first = time.perf_counter() - start
        output.append(line.decode(errors="replace"))
    status = process.wait()
    if status != 0:
        raise RuntimeError(f"lowbit {' '.join(command)} failed:\n{''.join(output)[-2000:]}")
    return {"first_output_s": round(first or 0.0, 2), "total_s": round(time.perf_counter() - start, 2)}


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def generate_ms_per_token(model, tokens: int = 32) -> float:
    import lowbit

    lowbit.generate(model, "Write a haiku about rivers.", max_new_tokens=4)  # warm up
    start = time.perf_counter()
    lowbit.generate(model, "Write a haiku about rivers.", max_new_tokens=tokens)
    return 1000 * (time.perf_counter() - start) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-demo", action="store_true", help="do not time the demo")
    args = parser.parse_args()
    import torch

    import lowbit
    from lowbit.eval import weight_bytes
    from lowbit.sources import default_model_path

    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "load_average_before": load_average()}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="lowbit-first-hour-"))

    if not args.skip_demo:
        start = time.perf_counter()
        timed(["compare", "--json", str(work / "demo.json")])
        result["demo_s"] = round(time.perf_counter() - start, 1)
        demo = json.loads((work / "demo.json").read_text())
        result["demo_verdict"] = demo["verdict"]
        result["demo_windows"] = demo["windows"]
        print(f"demo: {result['demo_s']} s ({demo['windows']} windows)", flush=True)

    out = work / "int4"
    commands = {
        "quantize": ["quantize", MODEL, "-s", "int4-g128", "-o", str(out), "--overwrite"],
        "eval": ["eval", str(out), "--windows", "2"],
        "compare": ["compare", MODEL, "--schemes", "int8", "--windows", "2"],
        "size": ["size", MODEL],
        "inspect": ["inspect", str(out)],
        "generate": ["generate", str(out), "-p", "Hello", "-n", "8"],
    }
    result["commands"] = {}
    for name, command in commands.items():
        timed(command)  # the first run (fills caches)
        result["commands"][name] = timed(command)
        print(f"{name}: first output after {result['commands'][name]['first_output_s']} s (second run)", flush=True)

    gguf = default_model_path()
    reference = lowbit.load(MODEL)
    sizes = {"source GGUF file": gguf.stat().st_size, "reference in memory (float32)": weight_bytes(reference)}
    for scheme, extra in (("int8", []), ("int4-g128", []), ("nf4-dq", []), ("int4-g128", ["--keep-dtype", "fp32"])):
        path = work / f"{scheme}{'-'.join(extra)}"
        timed(["quantize", MODEL, "-s", scheme, "-o", str(path), "--overwrite", *extra])
        sizes[f"{scheme} output{' (kept fp32)' if extra else ''}"] = directory_bytes(path)
    result["sizes_bytes"] = sizes

    speeds = {"float32": generate_ms_per_token(reference)}
    for scheme in ("int4-g128", "nf4-dq"):
        speeds[scheme] = generate_ms_per_token(lowbit.load(work / scheme))
    result["generate_ms_per_token"] = {k: round(v, 1) for k, v in speeds.items()}
    result["load_average_after"] = load_average()

    print(f"\nload average (1 min) before {result['load_average_before']:.1f}, after {result['load_average_after']:.1f}; {os.cpu_count()} cores")
    print("\ncommand    first output s  total s   (second run)")
    for name, timing in result["commands"].items():
        print(f"{name:<10}{timing['first_output_s']:>15.2f}{timing['total_s']:>9.2f}")
    print("\ngenerate ms/token: " + ", ".join(f"{k} {v:.1f}" for k, v in result["generate_ms_per_token"].items()))
    print("\nsizes:")
    for name, value in sizes.items():
        print(f"  {name:<36}{value / 1e6:>8.1f} MB")
    path = REPO / "bench" / "results" / f"first-hour-cpu-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
