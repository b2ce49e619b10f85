"""GGUF sources are dequantized once: the float model is cached as a plain transformers directory.

transformers reads a GGUF file by dequantizing every tensor to float32 (about 20 s for the
default SmolLM2-135M on 2 cores). lowbit does that once per file and keeps the result:

    $LOWBIT_CACHE (default ~/.cache/lowbit)/gguf/<file stem>-<key>/
        config.json             the model's config, without the GGUF quantization_config
        model.safetensors       float32, exactly as transformers dequantized it
        tokenizer files, generation_config.json
        lowbit-gguf.json        the GGUF's absolute path, size and mtime_ns, transformers' version

``<key>`` is a SHA-256 (16 hex digits) of the file's absolute path, size and modification
time, so an edited or replaced file gets a new entry. Before an entry is used, its
``lowbit-gguf.json`` is checked against the file again; an entry that does not match (or a
half-written one: entries are written under a temporary name and renamed into place) is
rebuilt; a temporary entry left by a killed run is removed by the next write. Later loads read the directory like any other, lazily when asked. Delete the
directory to reclaim the space; nothing else refers to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

from torch import nn

from lowbit.export.atomic import recover_leftovers

RECORD_FILE = "lowbit-gguf.json"


def cache_root() -> Path:
    """``$LOWBIT_CACHE``, else ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit").expanduser()


def _record(gguf_path: Path) -> dict:
    import transformers

    stat = gguf_path.stat()
    return {"gguf": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "transformers": transformers.__version__}


def entry_directory(gguf_path: str | os.PathLike) -> Path:
    """Where the dequantized copy of ``gguf_path`` lives (whether or not it exists yet)."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key}"


def _is_valid(directory: Path, record: dict) -> bool:
    try:
        return json.loads((directory / RECORD_FILE).read_text()) == record
    except (OSError, json.JSONDecodeError):
        return False


def _write(directory: Path, model: nn.Module, tokenizer, record: dict) -> None:
    """Write the entry under a temporary name beside ``directory``, then rename it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(directory)  # what a killed run left: .NAME.partial-PID
    temporary = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(temporary, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(temporary)
        (temporary / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if directory.exists():  # a stale or broken entry
            shutil.rmtree(directory, ignore_errors=True)
        try:
            temporary.rename(directory)
        except OSError:  # another process finished the same entry first
            if not _is_valid(directory, record):
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def dequantized_directory(gguf_path: str | os.PathLike, load: Callable[[], tuple[nn.Module, object]]) -> Path | None:
    """The cached float copy of ``gguf_path``, made with ``load()`` -> ``(model, tokenizer)``
    the first time. ``load`` must return the float model transformers dequantized, with its
    GGUF quantizer state removed. None (with a warning) when the cache cannot be written:
    the caller then loads the GGUF directly, as if there were no cache."""
    gguf_path = Path(gguf_path).resolve()
    directory = entry_directory(gguf_path)
    record = _record(gguf_path)
    if _is_valid(directory, record):
        return directory
    model, tokenizer = load()
    try:
        _write(directory, model, tokenizer, record)
    except OSError as error:
        warnings.warn(f"could not cache the dequantized GGUF in {directory.parent} ({error}); set LOWBIT_CACHE to a writable directory", stacklevel=2)
        return None
    return directory
