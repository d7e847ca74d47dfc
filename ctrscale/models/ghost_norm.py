"""Ghost batch normalization (Hoffer, Hubara & Soudry, "Train longer, generalize better",
NeurIPS 2017): batch normalization whose statistics come from "ghost" batches of a fixed
size, so a large batch is normalized as the small batches it replaces.

As eladhoffer/bigBatch does it: the batch is split into consecutive chunks of `ghost_size`
rows (the last may be smaller), each normalized with its own mean and biased variance, and
the running statistics are updated once per chunk with the usual momentum. In evaluation it
is plain batch norm with the running statistics. Under N processes each rank normalizes its
own rows; with `ghost_size` dividing the per-rank batch the chunks are the same rows as in
one process. Hand-written because torch has no ghost batch norm, and composer's differs from
the paper's code (it splits into a number of chunks, not chunks of a size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GhostBatchNorm1d(nn.BatchNorm1d):
    def __init__(self, num_features: int, ghost_size: int | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if ghost_size is not None and ghost_size < 1:
            raise ValueError(f"ghost_size must be positive (got {ghost_size})")
        self.ghost_size = ghost_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.ghost_size is None or x.shape[0] <= self.ghost_size:
            return super().forward(x)
        return torch.cat([self._chunk(chunk) for chunk in x.split(self.ghost_size)])

    def _chunk(self, chunk: Tensor) -> Tensor:
        if chunk.shape[0] == 1:  # one row has no variance: normalize with the running stats
            return F.batch_norm(
                chunk, self.running_mean, self.running_var, self.weight, self.bias,
                False, 0.0, self.eps,
            )  # fmt: skip
        self.num_batches_tracked += 1
        momentum = self.momentum
        if momentum is None:  # a cumulative average, as nn.BatchNorm1d (SWAP re-estimates so)
            momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            chunk, self.running_mean, self.running_var, self.weight, self.bias,
            True, momentum, self.eps,
        )  # fmt: skip
