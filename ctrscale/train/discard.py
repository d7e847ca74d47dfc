"""Discarding small-loss samples (Gao & Zhong 2020, "Study on the Large Batch Size Training of
Neural Networks Based on the Second Order Gradient", which tests it next to a batch-size
schedule): the ⌊q·B⌋ rows of the global batch with the smallest loss contribute no gradient;
the step's loss is the mean over the rest.

Exactly ⌊q·B⌋ rows are dropped whatever the world size: every rank gathers the global batch's
losses (B floats) and ranks them with ties broken by the row's position in the global batch,
so 1 and N processes drop the same rows.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def kept_rows(global_losses: Tensor, fraction: float) -> Tensor:
    """Mask of the rows kept: all but the ⌊q·B⌋ smallest losses (ties: the earlier row is
    dropped first)."""
    dropped = math.floor(fraction * global_losses.numel())
    order = torch.sort(global_losses, stable=True).indices
    kept = torch.ones_like(global_losses, dtype=torch.bool)
    kept[order[:dropped]] = False
    return kept


def local_kept_rows(losses: Tensor, fraction: float, rank: int, world_size: int) -> Tensor:
    """This rank's mask of `kept_rows` over the global batch (ranks hold equal, contiguous
    slices of it, in rank order)."""
    detached = losses.detach()
    if world_size == 1:
        return kept_rows(detached, fraction)
    gathered = [torch.empty_like(detached) for _ in range(world_size)]
    dist.all_gather(gathered, detached)
    kept = kept_rows(torch.cat(gathered), fraction)
    return kept.view(world_size, -1)[rank]
