"""CowClip: adaptive column-wise (per-id) clipping of embedding gradients.

Zheng et al., "CowClip: Reducing CTR Prediction Model Training Time from 12 hours to 10 minutes
on 1 GPU", AAAI 2023, Algorithm 1. For every embedding table and every id in the batch, with

    g    = the id's gradient row, summed over the batch, of the mean loss,
    cnt  = the number of samples in the batch that contain the id,
    w    = the id's embedding row before the update,

the gradient row is replaced by

    clip_t = cnt · max(r·‖w‖, ζ)
    g'     = g · min(1, clip_t / ‖g‖)          (g' = g = 0 when ‖g‖ = 0)

The official code (bytedance/LargeBatchCTR, `clip.py` + `train.py`) computes
`clip_t = r · cnt · max(‖w‖, r·√d·bound)` = `cnt · max(r·‖w‖, r²·√d·bound)`, i.e. the formula
above with ζ = r²·√d·bound (`zeta_from_official_bound`), so its published `--clip r --bound b`
transfer exactly.

Every function takes SQUARED row norms where a norm is needed, so that a caller whose rows are
split column-wise across shards can sum the shards' partial squared norms (an all-reduce) before
computing thresholds and factors. Counts and per-id sums must cover the whole (global) batch the
mean loss is taken over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def zeta_from_official_bound(r: float, dim: int, bound: float) -> float:
    """ζ such that `cnt·max(r‖w‖, ζ)` equals LargeBatchCTR's `cnt·r·max(‖w‖, r·√dim·bound)`.

    ζ = r²·√dim·bound; the paper's Criteo setting r=1, bound=1e-5, d=10 gives ζ = √10·1e-5.
    """
    return r * r * math.sqrt(dim) * bound


def cowclip_threshold(weight_sq_norm: Tensor, counts: Tensor, r: float, zeta: float) -> Tensor:
    """Per-id clip threshold `cnt · max(r·‖w‖, ζ)` from squared row norms ‖w‖² and counts."""
    floor_free = r * weight_sq_norm.sqrt()
    return counts.to(weight_sq_norm.dtype) * floor_free.clamp_min(zeta)


def cowclip_scale(
    grad_sq_norm: Tensor, weight_sq_norm: Tensor, counts: Tensor, r: float, zeta: float
) -> Tensor:
    """Per-id factor `min(1, cnt·max(r‖w‖, ζ) / ‖g‖)`, and 1 where ‖g‖ = 0.

    Inputs are squared norms ‖g‖², ‖w‖² (shape [n]) and counts (shape [n]); returns shape [n].
    """
    threshold = cowclip_threshold(weight_sq_norm, counts, r, zeta)
    grad_norm = grad_sq_norm.sqrt()
    clipped = grad_norm > threshold  # implies ‖g‖ > 0, so the division below is safe
    safe_norm = torch.where(clipped, grad_norm, torch.ones_like(grad_norm))
    return torch.where(clipped, threshold / safe_norm, torch.ones_like(grad_norm))


@dataclass(frozen=True)
class IdSegments:
    """The distinct ids of one batch of single-valued lookups and where each sample's id sits.

    `unique_ids[inverse[i]]` is sample i's id; `counts[k]` is how many samples hold
    `unique_ids[k]`; `representative[k]` is one of those samples (they all look up the same row).
    """

    unique_ids: Tensor
    inverse: Tensor
    counts: Tensor
    representative: Tensor


def segment_ids(ids: Tensor) -> IdSegments:
    """Group a single-valued feature's batch of ids (shape [B], repeats allowed) by id."""
    unique_ids, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    # Which sample a scatter with repeated targets keeps is unspecified, and irrelevant here.
    samples = torch.arange(ids.numel(), device=ids.device)
    representative = torch.empty_like(unique_ids).scatter_(0, inverse, samples)
    return IdSegments(unique_ids, inverse, counts, representative)


def segment_sums(segments: IdSegments, rows: Tensor) -> Tensor:
    """Per-id sums [n_ids, d] of per-sample rows [B, d]: an id's gradient row from the
    gradients reaching its samples' lookup outputs.

    The squared norms CowClip needs are `.square().sum(1)` of this and of the weight rows at
    `segments.representative`; for column-wise sharded tables each shard passes its own
    columns and the partial squared norms are summed over the shards.
    """
    summed = rows.new_zeros(segments.unique_ids.numel(), rows.shape[1])
    return summed.index_add_(0, segments.inverse, rows)
