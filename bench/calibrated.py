"""AWQ, SmoothQuant and FP8 W8A8 against RTN and llm-compressor's AWQ on SmolLM2-135M, same run.

Dev protocol of ../shared/data/README.md: 40 windows of 512 tokens of the dev file, KL to the
float model, perplexity and top-1 agreement; calibration: windows of 512 tokens at random
starts of the calib file, seed 0 (``lowbit.api.calibration_tokens``), the same token ids for
both tools. llm-compressor's AWQ runs in its own virtual environment (``bench/peers.py``'s
``ensure_venv``) through ``peer_llmcompressor_awq_worker.py`` (``IntermediatesCache.pin_memory``
patched to a no-op: it pins memory, which fails without a GPU) and is evaluated by
``bench/gptq.py``'s ``peer_row``. llm-compressor refuses group sizes that do not divide a row
(SmolLM2's rows are 576 wide), so its row is group 64, beside lowbit's AWQ at group 64 and 128.
llm-compressor's AWQ took about 8 minutes at 32 x 512 on 2 cores, and would take about half an
hour at 128 x 512: the default here is 32 calibration samples for both tools (``--calibration-samples``).

The W8A8 rows quantize activations per token in evaluation too (``QuantLinear.input_quantizer``),
so their perplexity is what a W8A8 kernel computes; ``perplexity_vs_float`` is the ratio to the
float model's (the target: within 1%). Every preset keeps ``lm_head`` in full precision.

    python bench/calibrated.py             # writes bench/results/calibrated-cpu-<date>.json
    python bench/calibrated.py --no-peers --rows "AWQ int4-g128,RTN int4-g128+clip" --windows 8 --calibration-samples 8
"""

from __future__ import annotations

from pathlib import Path

from gptq import DevProtocol, load_average, protocol_arguments

from lowbit.algorithms import SmoothQuantConfig
from lowbit.eval import evaluate_windows
from lowbit.plan import Plan, make_rule, resolve_scheme
from lowbit.report import format_table

AWQ_WORKER = Path(__file__).with_name("peer_llmcompressor_awq_worker.py")


def awq(fmt: str, **options) -> Plan:
    return Plan([make_rule("lm_head", "keep"), make_rule("*", {"format": fmt, "method": "awq", **options})], f"{fmt} awq")


#: label -> lowbit plan (None: llm-compressor's AWQ, bits and group from PEERS), in run order
ROWS = {
    "RTN int4-g128": lambda: resolve_scheme("int4-g128"),
    "RTN int4-g128+clip": lambda: resolve_scheme("int4-g128+clip"),
    "AWQ int4-g128": lambda: awq("int4-g128"),
    "W8A8 RTN": lambda: resolve_scheme("w8a8"),
    "W8A8 SmoothQuant": lambda: resolve_scheme("w8a8", "smoothquant"),
    "W8A8 SmoothQuant norms only": lambda: resolve_scheme("w8a8", SmoothQuantConfig(smooth_linears=False)),
    "W8A8-FP8 RTN": lambda: resolve_scheme("w8a8-fp8"),
    "W8A8-FP8 SmoothQuant": lambda: resolve_scheme("w8a8-fp8", "smoothquant"),
    "W8A8-FP8 SmoothQuant norms only": lambda: resolve_scheme("w8a8-fp8", SmoothQuantConfig(smooth_linears=False)),
    "RTN int4-g64+clip": lambda: resolve_scheme("int4-g64+clip"),
    "AWQ int4-g64": lambda: awq("int4-g64"),
    "llm-compressor AWQ W4A16_ASYM g64": None,
    "AWQ int4-g128 not sequential": lambda: awq("int4-g128", sequential=False),
}
PEERS = {"llm-compressor AWQ W4A16_ASYM g64": (4, 64)}


def main() -> None:
    args, labels = protocol_arguments(__doc__, ROWS, PEERS, 32, "calibrated")
    protocol = DevProtocol(args)
    float_row = {"scheme": "float (reference)", "load_average_before": load_average(),
                 **evaluate_windows(protocol.base, protocol.windows, protocol.reference, progress=False)}  # fmt: skip
    result = protocol.result("calibrated", [float_row])
    print(format_table([float_row]), flush=True)

    def relative_perplexity(row: dict) -> None:
        row["perplexity_vs_float"] = row["perplexity"] / float_row["perplexity"]

    protocol.run(labels, ROWS, PEERS, AWQ_WORKER, result, args.json, finish=relative_perplexity)
    protocol.summary(result, args.json)
    for row in result["rows"]:
        if "perplexity_vs_float" in row:
            print(f"{row['scheme']:<36} perplexity / float = {row['perplexity_vs_float']:.4f}")


if __name__ == "__main__":
    main()
