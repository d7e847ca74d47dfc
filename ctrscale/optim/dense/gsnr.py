"""VRGD: gradients scaled by their gradient signal-to-noise ratio (GSNR) before any base
optimizer (Jiang et al., "Accelerating Large Batch Training via Gradient Signal to Noise Ratio
(GSNR)", arXiv 2309.13681).

From k gradient samples of a parameter (ranks before the all-reduce, or micro-batches), given
as their mean μ and biased variance σ² (the samples are the population), element-wise:

    r = μ² / (σ² + ε·(σ² + μ²))               (r = 0 where every sample is 0)
    r̃ = clip(r / mean_tensor(r), low, high)   (r̃ = 1 before clipping if mean(r) = 0)
    g̃ = r̃ ⊙ μ                                 → `.grad`, then the base optimizer steps

The caller computes σ² in two passes, from the samples' deviations from μ: the one-pass
S2/k − μ² cancels catastrophically where σ² ≪ μ², and a sum in another order (another world
size) then changed r by several percent and, through mean(r), every r̃.

Only GSNR's definition, r = E[g]²/Var[g] (Liu, Jiang et al. 2020), is from the
literature; the paper's algorithm text was not available, so the per-tensor normalisation, the
clipping and the defaults are the project's reading. The floor ε is relative to the second
moment σ² + μ², so r ≤ 1/ε and, like GSNR itself, r does not change with the loss scale; ε = 1e-6
lies above float32's rounding of S2/k − μ² (≈ 1e-7·S2/k), so elements whose variance is
rounding noise all get r ≈ 1/ε rather than values decided by rounding. The bounds [0.1, 10] (one
decade either side of the tensor's mean GSNR) keep every element moving and stop one
near-noiseless element from taking a step up to (tensor size) times larger.

Trainer, per step, for the dense parameters (fused tables keep their usual gradient): the
micro-batch gradients of the step's graph (`DenseUpdate.gsnr_statistics`), their mean over
every rank (one all-reduce) and their squared deviations from it (a second), then `apply`
and the base optimizer's `step()`. Cost: k/N extra backward passes through the dense layers
per rank, the k/N samples' memory, and twice the dense all-reduce volume.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ctrscale.optim.scaling import HyperparameterError

GSNR_LOW, GSNR_HIGH, GSNR_EPS = 0.1, 10.0, 1e-6


def gsnr(mean: Tensor, variance: Tensor, eps: float = GSNR_EPS) -> Tensor:
    """r = μ²/(σ² + ε·(σ² + μ²)) element-wise; 0 where every sample is 0."""
    second_moment = variance + mean.square()
    ratio = mean.square() / (variance + eps * second_moment)
    return torch.where(second_moment > 0, ratio, 0.0)


def normalized_gsnr(ratio: Tensor, low: float = GSNR_LOW, high: float = GSNR_HIGH) -> Tensor:
    """r / mean(r) over the tensor, clipped to [low, high]; 1 (then clipped) if mean(r) = 0,
    which happens only where μ = 0 everywhere, so the scaled gradient is 0 anyway."""
    mean = ratio.mean()
    return torch.where(mean > 0, ratio / mean, 1.0).clamp_(low, high)


def gsnr_gradient(
    mean: Tensor,
    variance: Tensor,
    low: float = GSNR_LOW,
    high: float = GSNR_HIGH,
    eps: float = GSNR_EPS,
) -> Tensor:
    """g̃ = r̃ ⊙ μ for one tensor (the module docstring's rule)."""
    return normalized_gsnr(gsnr(mean, variance, eps), low, high) * mean


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
        self, params: Iterable[Tensor], means: Sequence[Tensor], variances: Sequence[Tensor]
    ) -> None:
        """`.grad` of each parameter ← g̃ from its samples' mean and biased variance (same
        order as `params`)."""
        for param, mean, variance in zip(params, means, variances, strict=True):
            scaled = gsnr_gradient(mean, variance, self.low, self.high, self.eps)
            if param.grad is None:
                param.grad = scaled
            else:
                param.grad.copy_(scaled)
