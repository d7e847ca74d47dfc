"""A batch-size ramp: the global batch doubles during the first part of a run, from
`data.ramp_from_batch_size` to `data.batch_size` (the batch-size schedule of Gao & Zhong 2020;
Smith et al. 2018, "Don't decay the learning rate, increase the batch size").

The loader yields batches of the starting size; step t trains on 2^stage(t) consecutive ones
joined, stage(t) = min(K, ⌊t·K / ramp_steps⌋), K = log2(batch_size / ramp_from_batch_size), so
every row is still used exactly once per epoch and a resumed run continues from the loader's
position. A step never spans two epochs: the last one of an epoch may join fewer. The learning
rates are those of `data.batch_size` throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from ctrscale.config import DataConfig
from ctrscale.data.loader import BatchWithExtras
from ctrscale.errors import CtrscaleError


@dataclass(frozen=True)
class Ramp:
    stages: int  # K: the batch doubles K times
    ramp_steps: int

    @classmethod
    def of(cls, data: DataConfig) -> Ramp | None:
        start = data.ramp_from_batch_size
        if start is None:
            return None
        ratio = data.batch_size // start
        if data.batch_size % start or ratio & (ratio - 1) or ratio < 2:
            raise CtrscaleError(
                f"data.ramp_from_batch_size={start}: data.batch_size={data.batch_size} must be "
                "it times a power of 2 (≥ 2)"
            )
        if data.ramp_steps is None:
            raise CtrscaleError("data.ramp_from_batch_size needs data.ramp_steps")
        return cls(int(math.log2(ratio)), data.ramp_steps)

    def joined(self, step: int) -> int:
        """How many loader batches step `step` (0-based) joins."""
        return 2 ** min(self.stages, step * self.stages // self.ramp_steps)

    def steps(self, batches_per_epoch: int, epochs: int) -> tuple[int, int]:
        """(steps of the first epoch, steps of `epochs` epochs)."""
        step, first = 0, None
        for _ in range(epochs):
            left = batches_per_epoch
            while left > 0:
                left -= min(left, self.joined(step))
                step += 1
            first = step if first is None else first
        return first, step


def join(batches: list[Batch]) -> Batch:
    """Consecutive batches of single-valued features as one: rows in order, every feature's
    ids side by side."""
    if len(batches) == 1:
        return batches[0]
    keys = batches[0].sparse_features.keys()
    ids = torch.cat(
        [b.sparse_features.values().view(len(keys), -1) for b in batches], dim=1
    ).flatten()
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=ids, lengths=torch.ones_like(ids, dtype=torch.int32)
    )
    extras = {
        name: torch.cat([b.extras[name] for b in batches])
        for name in getattr(batches[0], "extras", {})
    }
    return BatchWithExtras(
        torch.cat([b.dense_features for b in batches]),
        features,
        torch.cat([b.labels for b in batches]),
        extras,
    )
