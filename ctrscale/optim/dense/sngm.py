"""SNGM: stochastic normalized gradient descent with momentum (Zhao, Xie & Li, "Stochastic
Normalized Gradient Descent with Momentum for Large Batch Training", arXiv 2007.13985)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ctrscale.optim.dense.base import GroupwiseOptimizer, check_common, check_fraction, evaluate


def global_norm(tensors: Sequence[Tensor], extra_sq_norm: Tensor | float = 0.0) -> Tensor:
    """√(Σ‖t‖² + extra_sq_norm): the norm of all `tensors` taken as one vector, plus a squared
    norm contributed from elsewhere (e.g. sharded parameters, already all-reduced)."""
    sq = torch.stack(torch._foreach_norm(list(tensors))).square().sum()
    return (sq + extra_sq_norm).sqrt()


class Sngm(GroupwiseOptimizer):
    """SNGM, with d = g + λ·w the gradient of the loss plus the group's L2 term:

        u ← β·u + d / ‖d‖          ‖d‖ over ALL parameters of the optimizer, every group
        w ← w − η·u                 (u starts at 0; η is the group's `lr`, β its `momentum`)

    The norm is global, as in the paper (which reports block-wise normalisation not to help).
    Weight decay λ (`weight_decay`, 0 for biases/1-D with `weight_decay_param_groups`) is added
    to the gradient before normalising — our choice: then d is the gradient of the regularised
    objective the paper's analysis minimises. The direction d/‖d‖ makes the step independent
    of the loss scale (for λ = 0; λ·w does not scale with the loss). If ‖d‖ = 0 the step adds
    nothing to u (no 0/0).

    Distributed: the dense gradients are all-reduced (DDP) before `step`, so ‖d‖ is the same on
    every rank with no communication here. `extra_sq_norm`, if given, is called once per step
    and returns the squared norm of gradient parts outside this optimizer, summed over ranks
    (e.g. sharded parameters); they should then be normalised by the same `global_norm`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        extra_sq_norm: Callable[[], Tensor | float] | None = None,
    ) -> None:
        check_common(lr, weight_decay)
        check_fraction("SNGM", "momentum", momentum)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.extra_sq_norm = extra_sq_norm

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate(closure)
        selected = self.groups_with_grads()
        if not selected:
            return loss
        directions = [
            torch._foreach_add([p.grad for p in params], params, alpha=group["weight_decay"])
            for group, params in selected
        ]
        extra = 0.0 if self.extra_sq_norm is None else self.extra_sq_norm()
        norm = global_norm([d for group in directions for d in group], extra)
        inverse = torch.where(norm > 0, norm.reciprocal(), 0.0)
        for (group, params), direction in zip(selected, directions, strict=True):
            buffers = []
            for p in params:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(self.state[p]["momentum_buffer"])
            torch._foreach_mul_(direction, inverse)
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, direction)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss
