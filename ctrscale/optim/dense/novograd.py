"""NovoGrad (Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive Moments for
Training of Deep Networks", arXiv 1905.11286), per parameter tensor. Its row-wise form for
embedding tables is `RowwiseNovoGrad` in ctrscale/optim/embedding/optimizers.py.

Written here rather than wrapping `pytorch_optimizer.NovoGrad` (4.1): that one puts ε outside the
square root (g/(√v + ε); the paper g/√(v + ε)), which differs once ‖g‖² nears ε and by orders of
magnitude below (‖g‖ = 1e-6, ε = 1e-8: a normalised gradient of norm 0.01 inside, 0.99
outside), and it divides `.grad` in place, so the gradient is gone after the step. With ε → 0
the two agree (a test), so the rest of the rule is the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ctrscale.optim.dense.base import (
    GroupwiseOptimizer,
    check_betas,
    check_common,
    check_positive,
)

# The paper's defaults (and NeMo's, pytorch-optimizer's).
NOVOGRAD_BETAS = (0.95, 0.98)


def second_moments(previous: Tensor, sq_norms: Tensor, first: Tensor, beta2: float) -> Tensor:
    """v = ‖g‖² where `first` (the paper's initialisation, no bias correction needed), else
    β2·v + (1−β2)·‖g‖²; all arguments are 1-D, one entry per tensor (or per row)."""
    return torch.where(first, sq_norms, beta2 * previous + (1.0 - beta2) * sq_norms)


class NovoGrad(GroupwiseOptimizer):
    """NovoGrad, the paper's Algorithm 1, per parameter tensor w with gradient g:

        step 1:  v = ‖g‖²                        m = g / √(v + ε) + d·w
        then:    v = β2·v + (1−β2)·‖g‖²          m = β1·m + (g / √(v + ε) + d·w)
        always:  w ← w − λ·m

    v is one scalar per tensor, m is shaped like w; λ is the group's `lr`, d its `weight_decay`
    (zero for biases/1-D with `weight_decay_param_groups`). The paper writes step 1 as
    g/√v; ε is kept there too, so a zero first gradient gives m = d·w instead of 0/0.
    `.grad` is read, never modified.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float] = NOVOGRAD_BETAS,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        check_common(lr, weight_decay)
        check_betas("NovoGrad", betas)
        check_positive("NovoGrad", "eps", eps)
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        first = torch.tensor([not self.state[p] for p in params], device=params[0].device)
        for p in params:
            if not self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p)
                self.state[p]["exp_avg_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]

        sq_norms = torch.stack(torch._foreach_norm(grads)).square()
        v = second_moments(torch.stack(exp_avg_sqs), sq_norms, first, beta2)
        torch._foreach_copy_(exp_avg_sqs, list(v.unbind()))
        normalized = torch._foreach_div(grads, list((v + group["eps"]).sqrt().unbind()))
        if group["weight_decay"]:
            torch._foreach_add_(normalized, params, alpha=group["weight_decay"])
        torch._foreach_mul_(exp_avgs, beta1)  # m starts at 0, so step 1 gives m = normalized
        torch._foreach_add_(exp_avgs, normalized)
        torch._foreach_add_(params, exp_avgs, alpha=-group["lr"])
