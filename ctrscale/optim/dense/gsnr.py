"""VRGD: gradients scaled by their gradient signal-to-noise ratio (GSNR) before any base
optimizer (Jiang et al., "Accelerating Large Batch Training via Gradient Signal to Noise Ratio
(GSNR)", arXiv 2309.13681).

From k gradient samples of a parameter (ranks before the all-reduce, or micro-batches), given
as their sum S1 and sum of squares S2 (what one all-reduce of g and one of g² produce),
element-wise:

    μ = S1/k,   σ² = max(S2/k − μ², 0)        (biased variance: the samples are the population)
    r = μ² / (σ² + ε·S2/k)                    (r = 0 where S2 = 0, i.e. every sample is 0)
    r̃ = clip(r / mean_tensor(r), low, high)   (r̃ = 1 before clipping if mean(r) = 0)
    g̃ = r̃ ⊙ μ                                 → `.grad`, then the base optimizer steps

Only GSNR's definition, r = E[g]²/Var[g] (Liu, Jiang et al. 2020), is from the
literature; the paper's algorithm text was not available, so the per-tensor normalisation, the
clipping and the defaults are the project's reading. The floor ε is relative to the second
moment S2/k, so r ≤ 1/ε and, like GSNR itself, r does not change with the loss scale; ε = 1e-6
lies above float32's rounding of S2/k − μ² (≈ 1e-7·S2/k), so elements whose variance is
rounding noise all get r ≈ 1/ε rather than values decided by rounding. The bounds [0.1, 10] (one
decade either side of the tensor's mean GSNR) keep every element moving and stop one
near-noiseless element from taking a step up to (tensor size) times larger.

Trainer, per step, for the dense parameters (fused tables keep their usual gradient):
    1. for each of m micro-batches: forward + backward of that micro-batch's MEAN loss without
       DDP's all-reduce (`no_sync()`), S1 += .grad, S2 += .grad², zero the grads;
    2. all-reduce (sum) S1 and S2 over the ranks: k = m · world size samples (k ≥ 2);
    3. `GsnrTransform.apply(params, S1, S2, k)`: every rank gets the same `.grad`;
    4. the base optimizer's `step()`.
Cost: S1 and S2 (2× the dense gradients' memory) and twice the dense all-reduce volume.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ctrscale.optim.scaling import HyperparameterError

GSNR_LOW, GSNR_HIGH, GSNR_EPS = 0.1, 10.0, 1e-6


def gsnr(sum_grads: Tensor, sum_sq_grads: Tensor, k: int, eps: float = GSNR_EPS) -> Tensor:
    """r = μ²/(σ² + ε·S2/k) element-wise, biased σ²; 0 where every sample is 0."""
    mean = sum_grads / k
    second_moment = sum_sq_grads / k
    variance = (second_moment - mean.square()).clamp_(min=0.0)  # rounding can go below 0
    ratio = mean.square() / (variance + eps * second_moment)
    return torch.where(second_moment > 0, ratio, 0.0)


def normalized_gsnr(ratio: Tensor, low: float = GSNR_LOW, high: float = GSNR_HIGH) -> Tensor:
    """r / mean(r) over the tensor, clipped to [low, high]; 1 (then clipped) if mean(r) = 0,
    which happens only where μ = 0 everywhere, so the scaled gradient is 0 anyway."""
    mean = ratio.mean()
    return torch.where(mean > 0, ratio / mean, 1.0).clamp_(low, high)


def gsnr_gradient(
    sum_grads: Tensor,
    sum_sq_grads: Tensor,
    k: int,
    low: float = GSNR_LOW,
    high: float = GSNR_HIGH,
    eps: float = GSNR_EPS,
) -> Tensor:
    """g̃ = r̃ ⊙ μ for one tensor (the module docstring's rule)."""
    return normalized_gsnr(gsnr(sum_grads, sum_sq_grads, k, eps), low, high) * (sum_grads / k)


@dataclass(frozen=True)
class GsnrTransform:
    """The GSNR gradient transform's settings; `apply` writes g̃ into each parameter's `.grad`.

    Stateless: nothing to checkpoint. Defaults are the project's reading (module docstring).
    """

    low: float = GSNR_LOW
    high: float = GSNR_HIGH
    eps: float = GSNR_EPS

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high:
            raise HyperparameterError(
                f"GSNR bounds need 0 <= low <= high (got low={self.low}, high={self.high})"
            )
        if not self.high > 0:
            raise HyperparameterError(f"GSNR high must be positive (got {self.high})")
        if not self.eps > 0:
            raise HyperparameterError(f"GSNR eps must be positive (got {self.eps})")

    @torch.no_grad()
    def apply(
        self,
        params: Iterable[Tensor],
        sum_grads: Sequence[Tensor],
        sum_sq_grads: Sequence[Tensor],
        k: int,
    ) -> None:
        """`.grad` of each parameter ← g̃ from its k samples' Σg and Σg² (same order as
        `params`); k ≥ 2, since one sample has no variance."""
        if k < 2:
            raise HyperparameterError(f"GSNR needs k >= 2 gradient samples (got k={k})")
        for param, total, total_sq in zip(params, sum_grads, sum_sq_grads, strict=True):
            scaled = gsnr_gradient(total, total_sq, k, self.low, self.high, self.eps)
            if param.grad is None:
                param.grad = scaled
            else:
                param.grad.copy_(scaled)
