"""SWAP's phase 3: one model from W replicas' parameters (Gupta, Serrano & DeCoste 2020).

Dense parameters and buffers get the plain mean. An embedding row that only one replica's
data looked up moved in that replica alone, so the plain mean divides its phase-2 update by
W; the touch-weighted mean weighs replica i's row by c_i, the number of its phase-2 rows that
looked the id up: Σ c_i·w_i / Σ c_i, and the plain mean where no replica touched it.

Replicas are read one at a time into running sums, so memory holds one model and the sums,
not W models. Hand-written because `torch.optim.swa_utils.AveragedModel` averages one model
over time in memory and has no per-row weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from ctrscale.data.schema import SPARSE_FEATURES
from ctrscale.models.common import WIDE_SUFFIX

TABLE_MARKER = ".embedding_bags."


class RunningAverage:
    """The mean of the values added so far, or with row weights the row-weighted mean (rows
    whose weights sum to 0 take the plain mean)."""

    def __init__(self) -> None:
        self.count = 0
        self.total: Tensor | None = None
        self.weighted: Tensor | None = None
        self.weights: Tensor | None = None

    def add(self, value: Tensor, row_weights: Tensor | None = None) -> None:
        value = value.detach().to(torch.float64)
        self.count += 1
        self.total = value.clone() if self.total is None else self.total + value
        if row_weights is None:
            return
        w = row_weights.to(torch.float64).reshape(-1, *([1] * (value.dim() - 1)))
        self.weighted = w * value if self.weighted is None else self.weighted + w * value
        self.weights = w.clone() if self.weights is None else self.weights + w

    def result(self) -> Tensor:
        if self.total is None:
            raise ValueError("nothing was averaged")
        mean = self.total / self.count
        if self.weights is None:
            return mean
        return torch.where(self.weights > 0, self.weighted / self.weights.clamp_min(1), mean)


def average(values: list[Tensor], row_weights: list[Tensor] | None = None) -> Tensor:
    """The mean of `values`, or their row-weighted mean (see `RunningAverage`)."""
    running = RunningAverage()
    for i, value in enumerate(values):
        running.add(value, None if row_weights is None else row_weights[i])
    return running.result()


def table_of(key: str) -> str | None:
    """The embedding table a state-dict key belongs to (`…embedding_bags.C3.weight` → C3)."""
    if TABLE_MARKER not in key:
        return None
    return key.split(TABLE_MARKER, 1)[1].split(".", 1)[0]


def feature_of(table: str) -> str:
    """The feature a table looks up (a first-order table `C3_wide` reads C3)."""
    return table.removesuffix(WIDE_SUFFIX)


def local_pieces(value: object) -> Iterator[tuple[Tensor, int]]:
    """Every tensor this process holds of a state-dict value with its first row's index in
    the whole tensor: a plain tensor, or a ShardedTensor's local shards."""
    if isinstance(value, Tensor) and not hasattr(value, "local_shards"):
        yield value, 0
        return
    for shard in value.local_shards():
        yield shard.tensor, int(shard.metadata.shard_offsets[0])


def touch_counts(
    batches: Iterable, replicas: int, table_sizes: dict[str, int]
) -> list[dict[str, Tensor]]:
    """For each of `replicas` shards, how many of its rows looked up each id of each feature.
    `batches` are global batches of replicas × b rows, shard i being rows [i·b, (i+1)·b) of
    each (the loader's rank slicing)."""
    counts = [
        {f: np.zeros(table_sizes[f], dtype=np.int64) for f in SPARSE_FEATURES}
        for _ in range(replicas)
    ]
    for batch in batches:
        features = batch.sparse_features.to_dict()
        for feature in SPARSE_FEATURES:
            ids = features[feature].values().numpy().reshape(replicas, -1)
            for replica in range(replicas):
                counts[replica][feature] += np.bincount(
                    ids[replica], minlength=table_sizes[feature]
                )
    return [{f: torch.from_numpy(c) for f, c in replica.items()} for replica in counts]
