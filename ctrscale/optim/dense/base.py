"""Plumbing shared by ctrscale's own dense optimizers (optimizers.py, novograd.py, sngm.py,
curvature.py): the step loop over param groups, trust ratios with LAMBC's clip, and the
hyperparameter checks (each `HyperparameterError` names the argument)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ctrscale.optim.scaling import HyperparameterError


def trust_ratios(
    numerators: Sequence[Tensor], denominators: Sequence[Tensor], trust_clip: float | None
) -> list[Tensor]:
    """`numerator/denominator` per tensor, 1 where either is 0, then at most `trust_clip`.

    Clipping the ratio from above is LAMBC (Fong et al., 2020, "Improving Layer-wise Adaptive
    Rate Methods using Trust Ratio Clipping").
    """
    num = torch.stack(list(numerators))
    den = torch.stack(list(denominators))
    both_positive = (num > 0) & (den > 0)
    ratio = torch.where(both_positive, num / torch.where(both_positive, den, 1.0), 1.0)
    if trust_clip is not None:
        ratio = ratio.clamp(max=trust_clip)
    return list(ratio.unbind())


class GroupwiseOptimizer(torch.optim.Optimizer):
    """Shared `step` plumbing: gather the params with gradients of each group, then update.

    Subclasses whose update couples groups (a global norm, a median over layers) override
    `step` and use `groups_with_grads`.
    """

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        raise NotImplementedError

    def groups_with_grads(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """(group, its params that have a gradient) for every group with at least one."""
        selected = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise HyperparameterError(f"{type(self).__name__} does not take sparse gradients")
            if params:
                selected.append((group, params))
        return selected

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate(closure)
        for group, params in self.groups_with_grads():
            self._update_group(group, params)
        return loss


def evaluate(closure: Callable[[], float] | None) -> float | None:
    """The closure's loss, with gradients enabled (as torch's optimizers do)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def check_common(lr: float, weight_decay: float, trust_clip: float | None = None) -> None:
    if lr < 0:
        raise HyperparameterError(f"learning rate must be non-negative (got {lr})")
    if weight_decay < 0:
        raise HyperparameterError(f"weight_decay must be non-negative (got {weight_decay})")
    if trust_clip is not None and trust_clip <= 0:
        raise HyperparameterError(f"trust_clip must be positive or None (got {trust_clip})")


def check_fraction(optimizer: str, argument: str, value: float) -> None:
    """Momentum-like coefficients: in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise HyperparameterError(f"{optimizer} {argument} must be in [0, 1) (got {value})")


def check_betas(optimizer: str, betas: tuple[float, float]) -> None:
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise HyperparameterError(f"{optimizer} betas must be in [0, 1) (got {betas})")


def check_positive(optimizer: str, argument: str, value: float) -> None:
    if not value > 0:
        raise HyperparameterError(f"{optimizer} {argument} must be positive (got {value})")
