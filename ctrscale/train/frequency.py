"""Evaluation by id frequency: each eval row falls in the bucket of its rarest id — how often
that id occurs in the training split — so a result shows where a model loses, e.g. that large
batches hurt rare ids first.

Buckets are given by their lower edges: `train.frequency_buckets = [5, 100]` makes "<5"
(ids seen 0–4 times, unseen ids included), "5–99" and "≥100". The counts come from one read of
the training split's categorical columns, shared by the ranks (an all-reduce of one int64 per
table row); `[]` turns it off (for tables too large to count on every start).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec import KeyedJaggedTensor

from ctrscale.data.loader import ParquetBatchLoader
from ctrscale.data.schema import SPARSE_FEATURES
from ctrscale.errors import CtrscaleError


class IdFrequency:
    def __init__(self, counts: Tensor, table_sizes: dict[str, int], edges: Sequence[int]) -> None:
        if list(edges) != sorted(set(edges)) or not edges or edges[0] < 1:
            raise CtrscaleError(
                f"train.frequency_buckets={list(edges)}: increasing positive counts expected"
            )
        self.counts = counts
        sizes = torch.tensor([table_sizes[k] for k in SPARSE_FEATURES])
        self.offsets = torch.cumsum(sizes, 0) - sizes
        self.edges = torch.tensor(list(edges), dtype=torch.int64)
        self.labels = [f"<{edges[0]}"]
        self.labels += [f"{lo}–{hi - 1}" for lo, hi in itertools.pairwise(edges)]
        self.labels.append(f"≥{edges[-1]}")

    @classmethod
    def of_training_split(
        cls, loader: ParquetBatchLoader, edges: Sequence[int], rank: int, world_size: int
    ) -> IdFrequency:
        counts = torch.from_numpy(loader.id_counts(rank, world_size))
        if world_size > 1:
            dist.all_reduce(counts)
        return cls(counts, loader.table_sizes, edges)

    def rarest(self, features: KeyedJaggedTensor) -> Tensor:
        """Per row: the training count of its least frequent id over every feature."""
        if features.keys() != list(SPARSE_FEATURES):
            raise CtrscaleError("frequency buckets need the loader's features C1..C26 in order")
        rows = features.stride()
        values = features.values().to("cpu")
        if values.numel() != rows * len(SPARSE_FEATURES):
            raise CtrscaleError("frequency buckets need exactly one id per row and feature")
        keys = values.view(len(SPARSE_FEATURES), rows) + self.offsets[:, None]
        return self.counts[keys].min(dim=0).values

    def buckets(self, features: KeyedJaggedTensor) -> Tensor:
        """Per row: the index of its bucket in `labels`."""
        return torch.bucketize(self.rarest(features), self.edges, right=True)
