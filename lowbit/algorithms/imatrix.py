"""Importance matrices as llama.cpp computes and uses them: per input channel, the sum of x².

An importance matrix ("imatrix") holds, for each weight matrix ``W`` of a model, the sum over
every calibration token of the square of each input channel of ``y = W x``, and the number of
tokens summed (``llama-imatrix``, ``tools/imatrix/imatrix.cpp``: ``acc[j] += x[j] * x[j]``,
``counts += rows``). A quantizer reads ``sums / counts``, the mean square of each input
channel, as how much each column's error costs (``llama-quantize`` divides the same way before
handing it to the K-quants' weighted search; lowbit's RTN clip search weights columns by the
same ``input_mean_square``).

Entries are keyed by llama.cpp tensor name (``blk.0.attn_q.weight``). q, k and v read the
same input, so their entries are equal; llama.cpp stores each. A mixture-of-experts tensor has
one row of sums and one count per expert (``sums`` is ``(experts, features)``); a dense one has
one row. Sums and counts are float32, as the GGUF file stores them.

This module is tensor code only (accumulate, combine, divide); reading and writing the files
(GGUF, and llama.cpp's legacy ``.dat``) is ``lowbit/imatrix_file.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImportanceEntry:
    """Sums of x² per input channel, ``(experts, features)``, and tokens per expert, ``(experts,)``."""

    sums: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def zeros(cls, features: int, experts: int = 1, device: torch.device | str | None = None) -> ImportanceEntry:
        return cls(
            torch.zeros(experts, features, dtype=torch.float32, device=device),
            torch.zeros(experts, dtype=torch.float32, device=device),
        )

    def __post_init__(self) -> None:
        if self.sums.dim() == 1:
            self.sums = self.sums.reshape(1, -1)
        self.counts = self.counts.reshape(-1)
        if self.sums.shape[0] != self.counts.shape[0]:
            raise ValueError(f"{self.sums.shape[0]} rows of sums but {self.counts.shape[0]} counts")

    @property
    def features(self) -> int:
        return self.sums.shape[1]

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate a dense linear's inputs ``(..., features)``: every row is one token.

        Squares are summed in float32 whatever the inputs' dtype (fp16 cannot overflow).
        """
        x = inputs.detach().reshape(-1, inputs.shape[-1])
        if x.shape[1] != self.features:
            raise ValueError(f"inputs have {x.shape[1]} channels, this entry {self.features}")
        if self.sums.shape[0] != 1:
            raise ValueError("an entry with one row per expert needs the routing to accumulate")
        self.sums[0] += x.float().square().sum(0).to(self.sums.device)
        self.counts += x.shape[0]

    def importance(self) -> torch.Tensor:
        """Mean x² per input channel, ``(experts, features)``, as ``llama-quantize`` computes it:
        ``sums / counts``, and 1 for every channel of an expert that saw no token."""
        counts = self.counts.reshape(-1, 1)
        return torch.where(counts > 0, self.sums / counts.clamp(min=1), torch.ones_like(self.sums))

    def merged(self, other: ImportanceEntry) -> ImportanceEntry:
        """Both entries' tokens together (``llama-imatrix --in-file a --in-file b``): sums and counts add."""
        if other.sums.shape != self.sums.shape:
            raise ValueError(f"cannot merge entries of shapes {tuple(self.sums.shape)} and {tuple(other.sums.shape)}")
        return ImportanceEntry(self.sums + other.sums, self.counts + other.counts)


@dataclass
class ImportanceMatrix:
    """Entries by GGUF tensor name, and how they were computed (llama.cpp's ``imatrix.*`` keys)."""

    entries: dict[str, ImportanceEntry] = field(default_factory=dict)
    #: names of the calibration texts
    datasets: list[str] = field(default_factory=list)
    #: calibration chunks (windows) seen, and tokens per chunk
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> torch.Tensor | None:
        """Mean x² per input channel of tensor ``name`` (``(features,)`` for a dense tensor,
        ``(experts, features)`` for experts); None when the matrix has no entry for it."""
        entry = self.entries.get(name) or self.entries.get(f"{name}.weight")
        if entry is None:
            return None
        values = entry.importance()
        return values[0] if values.shape[0] == 1 else values

    def merged(self, other: ImportanceMatrix) -> ImportanceMatrix:
        """Both matrices' tokens together; entries only one of them has are kept as they are."""
        entries = dict(self.entries)
        for name, entry in other.entries.items():
            entries[name] = entries[name].merged(entry) if name in entries else entry
        return ImportanceMatrix(
            entries, self.datasets + other.datasets, self.chunk_count + other.chunk_count, self.chunk_size or other.chunk_size
        )
