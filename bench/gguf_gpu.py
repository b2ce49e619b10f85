"""GGUF block quantization on a CUDA GPU: the same bytes as on the CPU, and the time against
llama.cpp's ``llama-quantize`` on the same machine (issue 14's GPU row).

1. Bytes: every block type of ``lowbit.formats.gguf_blocks`` quantizes random matrices of
   awkward row counts on the CPU and on the GPU, with and without an importance vector; the
   CPU bytes are llama.cpp's (``tests/test_gguf_blocks_ggml.py``), so equal GPU bytes are too.
   Rows whose bytes differ are counted per type.
2. Time: the linear weights of ``--layers`` Llama-3-8B-shaped decoder layers (hidden 4096,
   intermediate 14336, 8 KV heads of 128), random, float16 values. lowbit quantizes them on
   the GPU (``quantize_ggml``, seconds with a CUDA synchronisation, after a warm-up);
   ``llama-quantize --pure`` quantizes an F16 GGUF of the same layers (written with gguf-py's
   GGUFWriter; a 256-token vocabulary, so the embedding and output add almost nothing) with
   ``--threads`` threads. Seconds per layer for each; JSON into ``--out``.

    python bench/gguf_gpu.py --llama-quantize path/to/llama-quantize --layers 2
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

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)  # not bench/: its gguf.py would shadow gguf-py

import gguf

from lowbit.formats.gguf_blocks import quantize_ggml

BYTE_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs")
TIMED_TYPES = {"q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K", "q8_0": "Q8_0", "iq4_xs": "IQ4_XS"}
#: (GGUF tensor name, out, in) of one Llama-3-8B decoder layer's linears
LINEARS = (
    ("attn_q", 4096, 4096), ("attn_k", 1024, 4096), ("attn_v", 1024, 4096), ("attn_output", 4096, 4096),
    ("ffn_gate", 14336, 4096), ("ffn_up", 14336, 4096), ("ffn_down", 4096, 14336),
)  # fmt: skip


def same_bytes(generator: torch.Generator) -> dict[str, dict[str, int]]:
    """Rows whose GPU bytes differ from the CPU's, per type, without and with importance."""
    out = {}
    for name in BYTE_TYPES:
        rows_differing = {}
        for label, rows, columns in (("plain", 97, 4096), ("importance", 61, 2816)):
            x = torch.randn(rows, columns, generator=generator) * 0.02
            x[::7, ::13] *= 12  # outliers
            x[5] = 0  # an all-zero row
            importance = torch.rand(columns, generator=generator) if label == "importance" else None
            cpu = quantize_ggml(name, x, importance)
            gpu = quantize_ggml(name, x.cuda(), None if importance is None else importance.cuda()).cpu()
            rows_differing[label] = int((cpu != gpu).any(1).sum())
        out[name] = rows_differing
        print(f"{name:<7} rows differing CPU vs GPU: {rows_differing}", flush=True)
    return out


def layer_weights(layers: int, generator: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    """Random float16 linear weights (std 0.02) of ``layers`` decoder layers, on the CPU."""
    return [
        (f"blk.{layer}.{name}.weight", (torch.randn(out, columns, generator=generator) * 0.02).half())
        for layer in range(layers) for name, out, columns in LINEARS
    ]  # fmt: skip


def write_f16_gguf(path: Path, weights: list[tuple[str, torch.Tensor]], layers: int) -> None:
    """A Llama GGUF of these layers (float16 linears, float32 norms), 256-token vocabulary."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(4096)
    writer.add_feed_forward_length(14336)
    writer.add_head_count(32)
    writer.add_head_count_kv(8)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_vocab_size(256)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    small = torch.Generator().manual_seed(1)
    writer.add_tensor("token_embd.weight", (torch.randn(256, 4096, generator=small) * 0.02).half().numpy())
    for name, tensor in weights:
        writer.add_tensor(name, tensor.numpy())
    for layer in range(layers):
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", torch.ones(4096).numpy())
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", torch.ones(4096).numpy())
    writer.add_tensor("output_norm.weight", torch.ones(4096).numpy())
    writer.add_tensor("output.weight", (torch.randn(256, 4096, generator=small) * 0.02).half().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def time_lowbit(weights: list[tuple[str, torch.Tensor]], type_name: str) -> float:
    """Seconds for lowbit to quantize every weight on the GPU (weights already there, float32)."""
    quantize_ggml(type_name, weights[0][1][:256])  # warm-up: kernels and caches
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _, tensor in weights:
        quantize_ggml(type_name, tensor)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def time_llama_quantize(binary: str, source: Path, ggml_type: str, threads: int, work: Path) -> float:
    target = work / f"out-{ggml_type}.gguf"
    start = time.perf_counter()
    subprocess.run([binary, "--pure", str(source), str(target), ggml_type, str(threads)], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-quantize", required=True, help="path of llama.cpp's llama-quantize")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "cpu_threads": args.threads,
        "torch": torch.__version__,
        "layers": args.layers,
        "model": "Llama-3-8B-shaped decoder layers, random float16 linear weights",
        "rows_differing_cpu_gpu": same_bytes(generator),
    }
    weights = layer_weights(args.layers, generator)
    on_gpu = [(name, tensor.cuda().float()) for name, tensor in weights]
    timings = {}
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "f16.gguf"
        write_f16_gguf(source, weights, args.layers)
        for type_name, ggml_type in TIMED_TYPES.items():
            gpu = time_lowbit(on_gpu, type_name)
            cpu = time_llama_quantize(args.llama_quantize, source, ggml_type, args.threads, Path(work))
            timings[ggml_type] = {
                "lowbit_gpu_seconds_per_layer": round(gpu / args.layers, 3),
                "llama_quantize_seconds_per_layer": round(cpu / args.layers, 3),
                "speedup": round(cpu / gpu, 2),
            }
            print(f"{ggml_type:<7} lowbit GPU {gpu / args.layers:7.3f} s/layer   llama-quantize {cpu / args.layers:7.3f} s/layer "
                  f"({args.threads} threads, whole run incl. load/write)   {cpu / gpu:5.2f}x", flush=True)  # fmt: skip
    report["timings"] = timings
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gguf-gpu-{report['date'][:10]}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
