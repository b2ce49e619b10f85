"""The ``lowbit`` command: parse arguments, call one API function, print the result.

Errors that are the user's to fix (a missing file, an unknown scheme, a corrupt file, a full
disk …) are printed as one ``error:`` line and exit with status 2; warnings as ``warning:``
lines. Anything else is a bug: one ``error:`` line says so and where to report it, exit
status 70; ``--debug`` adds the traceback. SIGTERM ends a run as Ctrl-C does (outputs being
written are removed); a closed pipe (``lowbit size … | head``) ends it quietly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

from lowbit.errors import LowbitError


#: where bugs are reported
ISSUES = "https://github.com/lowbit/lowbit/issues"


def _write_json(path: str | None, data: dict) -> None:
    if path:
        from lowbit.report import write_report

        write_report(path, json.dumps(data, indent=2, default=str) + "\n")
        print(f"wrote {path}")


def _check_report_path(path: str | None) -> None:
    """Refuse a ``--json`` path that cannot be written, before any work (not after it)."""
    if path:
        from lowbit.report import check_report_path

        check_report_path(path)


def _mb(value: int) -> str:
    return f"{value / 1e6:.1f} MB"


def _calibration_options(args) -> dict:
    return {
        "calibration": args.calibration,
        "calibration_samples": args.calibration_samples,
        "calibration_length": args.calibration_length,
    }


def _print_export(summary: dict) -> None:
    verb = "quantized" if summary["quantized_now"] else "holds"
    print(
        f"{verb} {summary['modules']} linear layers with {summary['plan']}"
        + (f" in {summary['quantization_seconds']:.1f} s" if summary["quantized_now"] else "")
        + f"\nweights: {_mb(summary['weight_bytes_before'])} -> {_mb(summary['weight_bytes'])}; "
        f"decoder linears: {summary['bits_per_weight_before']:.3f} -> {summary['bits_per_weight']:.3f} bits/weight\n"
        f"saved {summary['path']}" + ("" if summary["target"] == "native" else f" ({summary['target']})")
    )


def cmd_quantize(args) -> None:
    import lowbit

    summary = lowbit.export(
        args.model, args.output, to="native", scheme=args.scheme, method=args.method, device=args.device, overwrite=args.overwrite,
        keep_dtype=args.keep_dtype, allow_nonfinite=args.allow_nonfinite,
        imatrix=args.imatrix, **_calibration_options(args),
    )  # fmt: skip
    _print_export(summary)


def _gguf_export(args) -> None:
    import lowbit

    if args.scheme is not None:
        raise lowbit.LowbitError("--to gguf takes llama.cpp's types: use --type (Q4_K_M, Q8_0, ...), not --scheme")
    summary = lowbit.export_gguf(
        args.model, args.output, args.type or "Q8_0", imatrix_file=args.imatrix, calibration=args.calibration,
        calibration_samples=args.calibration_samples, calibration_length=args.calibration_length, method=args.method or "rtn",
        output_tensor_type=args.output_tensor_type, token_embedding_type=args.token_embedding_type, pure=args.pure,
        tensor_types=args.tensor_type or (), allow_requantize=args.allow_requantize, device=args.device, overwrite=args.overwrite,
        ollama=args.to == "ollama",
    )  # fmt: skip
    types = ", ".join(f"{count} {kind}" for kind, count in sorted(summary["tensor_types"].items()))
    print(f"wrote {summary['type']} ({types}) in {summary['seconds']:.1f} s: {_mb(summary['bytes'])}\nsaved {summary['path']} (gguf)")
    if "ollama" in summary:
        print(f"saved {summary['ollama']}/Modelfile: ollama create NAME -f {summary['ollama']}/Modelfile")


GGUF_ONLY = ("type", "imatrix", "output_tensor_type", "token_embedding_type", "pure", "tensor_type", "allow_requantize")


def cmd_export(args) -> None:
    import lowbit

    if args.to in ("gguf", "ollama"):
        return _gguf_export(args)
    given = [name for name in GGUF_ONLY if getattr(args, name)]
    if given:
        raise lowbit.LowbitError(f"--{given[0].replace('_', '-')} is an option of --to gguf")
    summary = lowbit.export(
        args.model, args.output, to=args.to, scheme=args.scheme, method=args.method, device=args.device,
        overwrite=args.overwrite, keep_dtype=args.keep_dtype, allow_nonfinite=args.allow_nonfinite,
        **_calibration_options(args),
    )  # fmt: skip
    _print_export(summary)


def cmd_imatrix(args) -> None:
    import lowbit

    matrix = lowbit.imatrix(
        args.model, args.calibration, args.output, calibration_samples=args.calibration_samples,
        calibration_length=args.calibration_length, bos=args.bos, device=args.device, batch_size=args.batch_size,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(
        f"importance of {len(matrix.entries)} tensors over {matrix.chunk_count} chunks of {matrix.chunk_size} tokens\n"
        f"saved {args.output} (llama.cpp's GGUF imatrix: llama-quantize --imatrix {args.output})"
    )


def cmd_eval(args) -> None:
    import lowbit
    from lowbit.report import COMPARISON_COLUMNS, format_notes, format_table

    result = lowbit.evaluate(
        args.model, reference=args.reference, data=args.data, windows=args.windows,
        window_length=args.window_length, batch_size=args.batch_size, bos=args.bos, device=args.device,
    )  # fmt: skip
    result["scheme"] = Path(args.model).name
    columns = [c for c in COMPARISON_COLUMNS if c[1] != "quantization_seconds"]
    print(format_table([result], columns))
    bos = "with BOS" if result["bos"] else "no BOS"
    print(f"({result['windows']} windows of {result['window_length']} tokens from {result['data']}, {bos}; bos: {str(result['bos']).lower()})")
    if result["reference"]:
        print(f"reference: {result['reference']}")
    print(format_notes(columns, result["windows"]))
    _write_json(args.json, result)


def _schemes(text: str | None) -> list[str] | tuple[str, ...]:
    import lowbit

    return [s.strip() for s in text.split(",") if s.strip()] if text else lowbit.DEFAULT_SCHEMES


def _budgets(args) -> dict[str, float] | None:
    import lowbit

    if args.max_kl is None:
        return None
    return {**lowbit.QUALITY_BUDGETS, "yours": args.max_kl}


def cmd_compare(args) -> None:
    import lowbit
    from lowbit.report import (
        COMPARISON_COLUMNS,
        format_measurement,
        format_notes,
        format_table,
        format_verdict,
    )

    result = lowbit.compare(
        args.model, _schemes(args.schemes), data=args.data, windows=args.windows, window_length=args.window_length,
        calibration=args.calibration, batch_size=args.batch_size, bos=args.bos, keep_dtype=args.keep_dtype,
        budgets=_budgets(args), device=args.device,
    )  # fmt: skip
    print(f"\n{format_measurement(result)}; bos: {str(result['bos']).lower()}")
    print(format_table(result["rows"]))
    print(format_notes(COMPARISON_COLUMNS, result["windows"]))
    print()
    print(format_verdict(result))
    _write_json(args.json, result)


def cmd_recipe(args) -> None:
    import lowbit
    from lowbit.report import (
        COMPARISON_COLUMNS,
        format_measurement,
        format_notes,
        format_table,
    )

    result = lowbit.recipe(
        args.model, max_kl=args.max_kl, data=args.data, windows=args.windows, window_length=args.window_length,
        calibration=args.calibration, batch_size=args.batch_size, bos=args.bos, keep_dtype=args.keep_dtype,
        device=args.device,
    )  # fmt: skip
    print(f"\n{format_measurement(result)}; bos: {str(result['bos']).lower()}")
    print(format_table(result["rows"]))
    print(format_notes(COMPARISON_COLUMNS, result["windows"]))
    print(f"\nbudget: KL < {result['max_kl']:g} (KL plus 2 standard errors): {result['advice']}")
    if result["command"]:
        print(f"make it: {result['command']}")
    _write_json(args.json, result)


def cmd_size(args) -> None:
    import lowbit
    from lowbit.report import format_size_report

    report = lowbit.size(args.model, context=args.context, batch=args.batch, gpu_memory=args.gpu_memory)
    print(format_size_report(report))
    _write_json(args.json, report)


def cmd_inspect(args) -> None:
    import lowbit

    report = lowbit.inspect(args.path)
    print(f"{report['path']} ({report['kind']}): {report['architecture']}")
    if report["plan"]:
        print(f"quantized by lowbit with {report['plan']} from {report['source']}")
    print(f"{report['parameters']:,} weights, {_mb(report['bytes'])}, {report['bits_per_weight']:.3f} bits/weight overall")
    print(f"\n{'format':<16}{'tensors':>8}{'weights':>16}{'MB':>10}{'bits/weight':>13}")
    for name, group in sorted(report["formats"].items(), key=lambda item: -item[1]["bytes"]):
        bits = "-" if group["bits_per_weight"] is None else f"{group['bits_per_weight']:.3f}"
        print(f"{name:<16}{group['tensors']:>8}{group['weights']:>16,}{group['bytes'] / 1e6:>10.1f}{bits:>13}")
    if args.tensors:
        print()
        for t in report["tensors"]:
            print(f"{t['name']:<56}{t['format']:<14}{t['shape']!s:<18}{t['bytes']:>12,}")
    _write_json(args.json, report)


def cmd_generate(args) -> None:
    import lowbit

    print(lowbit.generate(args.model, args.prompt, max_new_tokens=args.max_new_tokens, device=args.device))


def _add_eval_options(parser: argparse.ArgumentParser, windows_help: str) -> None:
    parser.add_argument("--data", "--eval-data", dest="data", help="evaluation text: a .txt or .jsonl file or a directory of .txt (default: built-in sample)")
    parser.add_argument("--windows", type=int, help=windows_help)
    parser.add_argument("--window-length", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--device", help="where to run the models: cpu, cuda, cuda:N (default: cpu)")
    parser.add_argument(
        "--bos", action=argparse.BooleanOptionalAction, default=None,
        help="start every window with the BOS token (default: when the model's tokenizer adds one, as Llama's and Gemma's do)",
    )  # fmt: skip


def _add_keep_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-dtype", choices=["fp32", "bf16", "fp16"],
        help="dtype the tensors left unquantized (embeddings, norms, lm_head) are stored in; default 16 bits: the source config's "
        "16-bit dtype, else float16 (bf16 where a value exceeds its range); fp32 stores float32. The model computes in the dtype "
        "it was loaded in either way (kept tensors are upcast on load)",
    )  # fmt: skip


def _add_quantize_options(parser: argparse.ArgumentParser, scheme_default: str | None = "int4-g128") -> None:
    from lowbit import PRESETS, method_names

    default = f"default {scheme_default}" if scheme_default else "default int4-g128 for a model not yet quantized"
    parser.add_argument(
        "--scheme", "-s", default=scheme_default,
        help=f"preset ({', '.join(PRESETS)}), format name, or plan file (.yaml/.json); add +clip for the clipping search ({default})",
    )  # fmt: skip
    parser.add_argument(
        "--method", "-m", choices=method_names(),
        help="algorithm for the rules that name none (default rtn); a plan file may set one per rule",
    )  # fmt: skip
    parser.add_argument("--output", "-o", required=True, help="output directory (written under a temporary name, then renamed)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    parser.add_argument("--calibration", help="calibration text (.txt, .jsonl or a directory) for algorithms that use statistics, such as +clip (default: built-in text)")
    parser.add_argument("--calibration-samples", type=int, default=128, help="calibration windows drawn from the text (default 128)")
    parser.add_argument("--calibration-length", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--device", help="where each layer is quantized: cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    _add_keep_dtype(parser)
    parser.add_argument(
        "--allow-nonfinite", action="store_true",
        help="replace NaN and infinite source weights with zeros (and say so) instead of refusing the model",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from lowbit import DEFAULT_MODEL, DEFAULT_SCHEMES, exporter_names

    parser = argparse.ArgumentParser(prog="lowbit", description="Make LLMs small and measure what it cost.")
    parser.add_argument("--version", action="version", version=f"lowbit {__import__('lowbit').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = f"a model directory, a GGUF file, a hub id, or {DEFAULT_MODEL} (the embedded default)"

    p = sub.add_parser("quantize", help="quantize a model and save a native checkpoint (= export --to native)")
    p.add_argument("model", help=model_help)
    _add_quantize_options(p)
    p.add_argument("--imatrix", help="an importance matrix (llama.cpp's .gguf or .dat, lowbit imatrix) weighting the clipping search (+clip) instead of calibration text")
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("export", help="write a model in a runtime's layout, quantizing it first if it is not yet")
    p.add_argument("model", help=model_help + ", or a lowbit checkpoint (written as it is)")
    p.add_argument("--to", default="native", choices=exporter_names(), help="target layout (default native)")
    _add_quantize_options(p, scheme_default=None)
    gguf = p.add_argument_group("GGUF (--to gguf), as llama-quantize")
    gguf.add_argument("--type", "-t", help="llama.cpp's mix: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K, IQ4_XS, F16 ... (default Q8_0)")
    gguf.add_argument("--imatrix", help="importance matrix file (llama-imatrix's or lowbit imatrix's); or --calibration TEXT to measure one")
    gguf.add_argument("--output-tensor-type", help="type of output.weight (e.g. q8_0)")
    gguf.add_argument("--token-embedding-type", help="type of token_embd.weight")
    gguf.add_argument("--pure", action="store_true", help="the mix's base type for every tensor, no per-tensor rules")
    gguf.add_argument("--tensor-type", action="append", metavar="REGEX=TYPE", help="type of the tensors whose name matches (first match wins; repeatable)")
    gguf.add_argument("--allow-requantize", action="store_true", help="allow re-quantizing a GGUF source that is already low-bit")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("imatrix", help="measure an importance matrix in llama.cpp's format (for llama-quantize --imatrix)")
    p.add_argument("model", help=model_help)
    p.add_argument("--calibration", required=True, help="calibration text: a .txt file, a .jsonl of texts or chats, or a directory of .txt")
    p.add_argument("--output", "-o", required=True, help="the imatrix file to write (GGUF, as llama-imatrix writes it)")
    p.add_argument("--calibration-samples", type=int, default=128, help="chunks taken from the start of the text (default 128)")
    p.add_argument("--calibration-length", type=int, default=512, help="tokens per chunk (default 512, llama-imatrix's)")
    p.add_argument("--batch-size", type=int, default=8, help="chunks per forward pass (default 8)")
    p.add_argument("--device", help="where each layer runs: cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument(
        "--bos", action=argparse.BooleanOptionalAction, default=None,
        help="start every chunk with the BOS token, as llama-imatrix does (default: when the model's tokenizer adds one)",
    )  # fmt: skip
    p.set_defaults(run=cmd_imatrix)

    p = sub.add_parser("eval", help="perplexity, KL and top-1 against a reference, memory and speed")
    p.add_argument("model", help=model_help + ", or a lowbit checkpoint")
    p.add_argument("--reference", help="the unquantized model, for KL divergence and top-1 agreement")
    _add_eval_options(p, "number of windows (default: as many as the text holds, at most 40)")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("compare", help="quantize to several schemes, print the comparison table and a verdict")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help + f" (default {DEFAULT_MODEL})")
    p.add_argument("--schemes", help=f"comma-separated schemes (default {','.join(DEFAULT_SCHEMES)})")
    p.add_argument("--calibration", help="calibration text file for +clip schemes (default: built-in text)")
    p.add_argument("--max-kl", type=float, help="your own quality budget, beside near-lossless (KL 0.02) and good (0.1)")
    _add_keep_dtype(p)
    _add_eval_options(p, "number of windows (default: as many as the text holds, at most 40)")
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("recipe", help="walk int8 -> int4 -> calibrated int4 on your text; stop at the first within a KL budget")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help + f" (default {DEFAULT_MODEL})")
    p.add_argument("--max-kl", type=float, default=0.1, help="the quality budget: largest KL divergence from the unquantized model (default 0.1, good; 0.02 is near-lossless)")
    p.add_argument("--calibration", help="calibration text for the calibrated rungs (default: built-in text)")
    _add_keep_dtype(p)
    _add_eval_options(p, "number of windows (default: as many as the text holds, at most 40)")
    p.set_defaults(run=cmd_recipe)

    p = sub.add_parser("size", help="memory needed in every format, from the config alone (no weight is read)")
    p.add_argument("model", help=model_help + ", a lowbit checkpoint, or a config.json file")
    p.add_argument("--context", type=int, default=4096, help="tokens of context for the KV cache (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences at once (default 1)")
    p.add_argument("--gpu-memory", help="memory to fit in, e.g. 24GB or 80GiB")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(run=cmd_size)

    p = sub.add_parser("inspect", help="what a checkpoint or GGUF file holds")
    p.add_argument("path", help="a lowbit checkpoint, a Hugging Face model directory, or a GGUF file")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("generate", help="see what a (quantized) model writes")
    p.add_argument("model", help=model_help + ", or a lowbit checkpoint")
    p.add_argument("--prompt", "-p", required=True, help="the text to continue (instruct models get their chat template)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--device", help="where to run: cpu, cuda, cuda:N (default: cpu)")
    p.set_defaults(run=cmd_generate)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


class _Terminated(BaseException):
    """SIGTERM, raised where the program is, so that what is being written is cleaned up."""


def _terminate(signum, frame) -> None:
    raise _Terminated


def _silence_stdout() -> None:
    """After a closed pipe: send what is left to /dev/null, so that exiting does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a file (captured)


def _os_error(error: OSError) -> str:
    where = f": {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; the single place where every failure becomes one ``error:`` line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="on an unexpected error (a bug), print the full traceback")
    args = parser.parse_args(argv)
    on_sigterm = signal.signal(signal.SIGTERM, _terminate) if _in_main_thread() else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            _check_report_path(getattr(args, "json", None))
            args.run(args)
            sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except (LowbitError, OSError, KeyboardInterrupt, _Terminated, Exception) as error:
        if debug:
            traceback.print_exc()
        if isinstance(error, LowbitError):
            print(f"error: {error}", file=sys.stderr)
            return 2
        if isinstance(error, OSError):  # the environment's: a full disk, a permission, a vanished file
            print(f"error: {_os_error(error)}", file=sys.stderr)
            return 2
        if isinstance(error, (KeyboardInterrupt, _Terminated)):
            print(f"{'interrupted' if isinstance(error, KeyboardInterrupt) else 'terminated'}; nothing was written", file=sys.stderr)
            return 130 if isinstance(error, KeyboardInterrupt) else 143
        hint = "" if debug else " (run it again with --debug for the traceback)"
        print(
            f"error: internal error in lowbit {__import__('lowbit').__version__}, a bug: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}; please report it at {ISSUES} with the command you ran{hint}",
            file=sys.stderr,
        )
        return 70
    finally:
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)
    return 0


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
