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

    `unique_ids[inverse[i]]` is sample i's id; `counts[k]` is how many samples hold `unique_ids[k]`.
    """

    unique_ids: Tensor
    inverse: Tensor
    counts: Tensor


def segment_ids(ids: Tensor) -> IdSegments:
    """Group a single-valued feature's batch of ids (shape [B], repeats allowed) by id."""
    unique_ids, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return IdSegments(unique_ids, inverse, counts)


def segment_sq_norms(
    segments: IdSegments, grad_out_rows: Tensor, weight_rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-id squared norms (‖Σ_samples g‖², ‖w‖²) of the columns this caller holds.

    `grad_out_rows` [B, d] are the per-sample gradients reaching the lookup output and
    `weight_rows` [B, d] the looked-up rows (one per sample). For column-wise sharded tables each
    shard passes its own columns and sums the returned partial squared norms over shards.
    """
    num_ids = segments.unique_ids.numel()
    summed_grad = grad_out_rows.new_zeros(num_ids, grad_out_rows.shape[1])
    summed_grad.index_add_(0, segments.inverse, grad_out_rows)
    # Every sample of an id carries the same row, so any of them gives the id's norm; amax is
    # a deterministic way to pick one.
    weight_sq_norm = weight_rows.new_zeros(num_ids).scatter_reduce_(
        0, segments.inverse, weight_rows.square().sum(dim=1), reduce="amax", include_self=False
    )
    return summed_grad.square().sum(dim=1), weight_sq_norm
