"""Batch assembly: the arrays rows are decoded and gathered into, and the TorchRec batch.

Owns the row-major window buffer (`Rows`) that decoded row groups land in and shuffled
batches are gathered from, the per-batch arrays (`BatchArrays`) with ids turned feature-major
by a blocked transpose, the precomputed `KeyedJaggedTensor` layout, and `BatchWithExtras`,
the `Batch` that carries extra columns such as `p_true`. The numpy paths here were tuned
(docs/loader.md, "Throughput"): every copy is deliberate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ctrscale.data import schema

NUM_DENSE = len(schema.DENSE_FEATURES)
NUM_SPARSE = len(schema.SPARSE_FEATURES)
SPARSE_KEYS: list[str] = list(schema.SPARSE_FEATURES)
_INDEX_PER_KEY: dict[str, int] = {key: i for i, key in enumerate(SPARSE_KEYS)}


@dataclass
class BatchWithExtras(Batch):
    """A `Batch` that also carries per-row extra columns (e.g. `p_true`) through `.to()`."""

    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device, non_blocking: bool = False) -> BatchWithExtras:
        moved = super().to(device, non_blocking=non_blocking)
        extras = {
            name: t.to(device=device, non_blocking=non_blocking) for name, t in self.extras.items()
        }
        return BatchWithExtras(moved.dense_features, moved.sparse_features, moved.labels, extras)

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        for tensor in self.extras.values():
            tensor.record_stream(stream)

    def pin_memory(self) -> BatchWithExtras:
        pinned = super().pin_memory()
        extras = {name: t.pin_memory() for name, t in self.extras.items()}
        return BatchWithExtras(pinned.dense_features, pinned.sparse_features, pinned.labels, extras)


class KjtLayout:
    """Lengths/offsets of single-valued features, built once per loader, sliced per batch.

    Every feature has exactly one id per row, so lengths are all ones and offsets a range:
    passing them (and the per-key sizes) precomputed spares the KJT its own bookkeeping,
    as TorchRec's Criteo loader does.
    """

    def __init__(self, max_rows: int) -> None:
        num_ids = NUM_SPARSE * max_rows
        self._lengths = torch.ones(num_ids, dtype=torch.int32)
        self._offsets = torch.arange(num_ids + 1, dtype=torch.int32)

    def kjt(self, values: torch.Tensor, rows: int) -> KeyedJaggedTensor:
        num_ids = NUM_SPARSE * rows
        return KeyedJaggedTensor(
            keys=SPARSE_KEYS,
            values=values,
            lengths=self._lengths[:num_ids],
            offsets=self._offsets[: num_ids + 1],
            stride=rows,
            length_per_key=[rows] * NUM_SPARSE,
            offset_per_key=[rows * i for i in range(NUM_SPARSE + 1)],
            index_per_key=_INDEX_PER_KEY,
        )


# Rows per step of a blocked transpose: both sides of the step stay in L1/L2, which makes it
# ~5x faster than numpy's or torch's whole-array transpose copy of a large batch.
_TRANSPOSE_BLOCK = 1024

Selection = np.ndarray | slice


def _sub_selection(rows: Selection, start: int, stop: int) -> Selection:
    if isinstance(rows, slice):
        return slice(rows.start + start, rows.start + min(stop, rows.stop - rows.start))
    return rows[start:stop]


def _selection_size(rows: Selection) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


@dataclass
class BatchArrays:
    """One local batch as the tensors want it: ids feature-major (26, n), the KJT's layout."""

    labels: np.ndarray
    dense: np.ndarray
    ids: np.ndarray
    extras: dict[str, np.ndarray]

    @classmethod
    def allocate(cls, num_rows: int, extra_dtypes: dict[str, np.dtype]) -> BatchArrays:
        return cls(
            labels=np.empty(num_rows, dtype=np.float32),
            dense=np.empty((num_rows, NUM_DENSE), dtype=np.float32),
            ids=np.empty((NUM_SPARSE, num_rows), dtype=np.int64),
            extras={name: np.empty(num_rows, dtype=dt) for name, dt in extra_dtypes.items()},
        )

    def to_batch(self, layout: KjtLayout) -> Batch:
        """Tensors sharing the arrays' memory; a `BatchWithExtras` when there are extra columns."""
        fields: dict[str, Any] = dict(
            dense_features=torch.from_numpy(self.dense),
            sparse_features=layout.kjt(torch.from_numpy(self.ids.reshape(-1)), len(self.labels)),
            labels=torch.from_numpy(self.labels),
        )
        if not self.extras:
            return Batch(**fields)
        extras = {name: torch.from_numpy(a) for name, a in self.extras.items()}
        return BatchWithExtras(**fields, extras=extras)


@dataclass
class Rows:
    """Decoded rows of a window, row-major: labels (n,), dense (n, 13), sparse ids (n, 26).

    Row-major ids make a shuffled gather read one 208-byte run per row instead of 26
    scattered values. The buffer is reused window after window (first-touching a fresh
    multi-100 MB array costs more than decoding it), so batches copy out of it.
    """

    labels: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    extras: dict[str, np.ndarray]

    @classmethod
    def allocate(cls, num_rows: int, extra_dtypes: dict[str, np.dtype]) -> Rows:
        return cls(
            labels=np.empty(num_rows, dtype=np.float32),
            dense=np.empty((num_rows, NUM_DENSE), dtype=np.float32),
            sparse=np.empty((num_rows, NUM_SPARSE), dtype=np.int64),
            extras={name: np.empty(num_rows, dtype=dt) for name, dt in extra_dtypes.items()},
        )

    def head(self, num_rows: int) -> Rows:
        return Rows(
            self.labels[:num_rows],
            self.dense[:num_rows],
            self.sparse[:num_rows],
            {name: a[:num_rows] for name, a in self.extras.items()},
        )

    def copy_to(self, rows: Selection, out: BatchArrays, start: int) -> None:
        """Copy the selected rows to `out` from row `start` on, transposing the ids."""
        size = _selection_size(rows)
        target = slice(start, start + size)
        for source, destination in self._column_pairs(out):
            if isinstance(rows, slice):
                destination[target] = source[rows]
            else:  # gathers straight into the batch, without a temporary
                np.take(source, rows, axis=0, out=destination[target])
        for block in range(0, size, _TRANSPOSE_BLOCK):
            block_rows = _sub_selection(rows, block, block + _TRANSPOSE_BLOCK)
            block_size = _selection_size(block_rows)
            out.ids[:, start + block : start + block + block_size] = self.sparse[block_rows].T

    def _column_pairs(self, out: BatchArrays) -> list[tuple[np.ndarray, np.ndarray]]:
        """(window array, batch array) of everything but the ids, which are transposed."""
        pairs = [(self.labels, out.labels), (self.dense, out.dense)]
        return pairs + [(values, out.extras[name]) for name, values in self.extras.items()]


def transpose_into(source: np.ndarray, target: np.ndarray) -> None:
    """target[i, j] = source[j, i], blockwise (see _TRANSPOSE_BLOCK)."""
    for block in range(0, target.shape[0], _TRANSPOSE_BLOCK):
        stop = block + _TRANSPOSE_BLOCK
        target[block:stop] = source[:, block:stop].T
