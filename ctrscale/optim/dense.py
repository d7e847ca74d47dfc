"""Optimizers of the dense (non-embedding) parameters: Adam, AdamW, SGD, LAMB, LARS.

Adam, AdamW and SGD are `torch.optim`'s. LAMB and LARS are written here with `torch._foreach`
ops because `pytorch_optimizer`'s (4.1) differ from the papers: its `Lamb` has no bias correction
(Algorithm 2 has it), clamps ‖w‖ to at most 10 and adds ε to ‖update‖ in the trust ratio; its
`LARS` applies the global LR outside the momentum buffer (the paper inside, which differs as soon
as the LR changes, e.g. during warm-up) and neither offers trust-ratio clipping.

Every optimizer gets two param groups (`weight_decay_param_groups`): weight matrices with the
weight decay, and biases / 1-D parameters (norm scales) without it; LAMB and LARS also leave the
latter out of trust-ratio adaptation. No optimizer here clips the global gradient norm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ctrscale.optim.scaling import HyperparameterError

DENSE_OPTIMIZERS = ("adam", "adamw", "sgd", "lamb", "lars")


def excluded_from_decay(name: str, param: Tensor) -> bool:
    """Biases and 1-D parameters (norm scales/shifts) get neither weight decay nor trust ratios.

    As in LAMB's BERT setup (bias and LayerNorm excluded from decay and layer adaptation).
    """
    return param.ndim <= 1 or name.endswith("bias")


def _split_by_decay(
    named_parameters: Iterable[tuple[str, Tensor]],
) -> tuple[list[Tensor], list[Tensor]]:
    """(decayed matrices, excluded biases/1-D) among the parameters that require gradients."""
    decayed: list[Tensor] = []
    excluded: list[Tensor] = []
    for name, param in named_parameters:
        if param.requires_grad:
            (excluded if excluded_from_decay(name, param) else decayed).append(param)
    return decayed, excluded


def weight_decay_param_groups(
    named_parameters: Iterable[tuple[str, Tensor]], weight_decay: float
) -> list[dict[str, Any]]:
    """[matrices with `weight_decay`, biases/1-D with 0.0], without empty groups."""
    decayed, excluded = _split_by_decay(named_parameters)
    groups = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": excluded, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def lamb_lars_param_groups(
    named_parameters: Iterable[tuple[str, Tensor]], weight_decay: float
) -> list[dict[str, Any]]:
    """[matrices: `weight_decay`, trust ratio on; biases/1-D: no decay, trust ratio off],
    without empty groups."""
    decayed, excluded = _split_by_decay(named_parameters)
    groups = [
        {"params": decayed, "weight_decay": weight_decay, "trust_ratio": True},
        {"params": excluded, "weight_decay": 0.0, "trust_ratio": False},
    ]
    return [group for group in groups if group["params"]]


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


class _LayerwiseOptimizer(torch.optim.Optimizer):
    """Shared `step` plumbing: gather the params with gradients of each group, then update."""

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise HyperparameterError(f"{type(self).__name__} does not take sparse gradients")
            if params:
                self._update_group(group, params)
        return loss


class Lamb(_LayerwiseOptimizer):
    """LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", ICLR 2020, Algorithm 2), per parameter tensor x with gradient g at step t ≥ 1:

        m = β1·m + (1−β1)·g,          v = β2·v + (1−β2)·g²
        m̂ = m / (1−β1^t),             v̂ = v / (1−β2^t)          (bias correction, Algorithm 2)
        u = m̂ / (√v̂ + ε) + λ·x
        ρ = min(‖x‖ / ‖u‖, trust_clip)  (ρ = 1 if ‖x‖ = 0 or ‖u‖ = 0; no clip if trust_clip=None)
        x ← x − η·ρ·u

    φ of the paper is the identity. Groups with `trust_ratio=False` use ρ = 1 (plain Adam with
    L2-in-update λ, which `lamb_lars_param_groups` sets to 0 for them).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_clip: float | None = None,
        trust_ratio: bool = True,
    ) -> None:
        _check_common(lr, weight_decay, trust_clip)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise HyperparameterError(f"LAMB betas must be in [0, 1) (got {betas})")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "trust_clip": trust_clip,
            "trust_ratio": trust_ratio,
        }
        super().__init__(params, defaults)

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            states.append(state)
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]

        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        m_hat = torch._foreach_div(exp_avgs, [1.0 - beta1 ** s["step"] for s in states])
        denominators = torch._foreach_div(
            torch._foreach_sqrt(exp_avg_sqs), [(1.0 - beta2 ** s["step"]) ** 0.5 for s in states]
        )
        torch._foreach_add_(denominators, group["eps"])
        updates = torch._foreach_div(m_hat, denominators)
        if group["weight_decay"]:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        if group["trust_ratio"]:
            ratios = trust_ratios(
                torch._foreach_norm(params), torch._foreach_norm(updates), group["trust_clip"]
            )
            torch._foreach_mul_(updates, ratios)
        torch._foreach_add_(params, updates, alpha=-group["lr"])


class Lars(_LayerwiseOptimizer):
    """LARS (You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017,
    Algorithm 1), per parameter tensor w with gradient g, global LR γ (the group's `lr` at this
    step), trust coefficient η, weight decay β and momentum μ:

        ρ = min(η·‖w‖ / (‖g‖ + β·‖w‖), trust_clip)   (ρ = 1 if ‖w‖ = 0 or the denominator is 0)
        v ← μ·v + γ·ρ·(g + β·w)                       (v starts at 0)
        w ← w − v

    The global LR sits inside the momentum buffer as in the paper. Groups with
    `trust_ratio=False` use ρ = 1 (plain SGD with momentum, β = 0 from `lamb_lars_param_groups`).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        trust_clip: float | None = None,
        trust_ratio: bool = True,
    ) -> None:
        _check_common(lr, weight_decay, trust_clip)
        if not 0.0 <= momentum < 1.0:
            raise HyperparameterError(f"LARS momentum must be in [0, 1) (got {momentum})")
        if trust_coefficient <= 0:
            raise HyperparameterError(
                f"LARS trust_coefficient must be positive (got {trust_coefficient})"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "trust_clip": trust_clip,
            "trust_ratio": trust_ratio,
        }
        super().__init__(params, defaults)

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        weight_decay = group["weight_decay"]
        grads = [p.grad for p in params]
        scaled = torch._foreach_add(grads, params, alpha=weight_decay)
        if group["trust_ratio"]:
            weight_norms = torch._foreach_norm(params)
            denominators = torch._foreach_add(
                torch._foreach_norm(grads), torch._foreach_mul(weight_norms, weight_decay)
            )
            numerators = torch._foreach_mul(weight_norms, group["trust_coefficient"])
            torch._foreach_mul_(scaled, trust_ratios(numerators, denominators, group["trust_clip"]))

        buffers = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffers.append(state["momentum_buffer"])
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, scaled, alpha=group["lr"])
        torch._foreach_sub_(params, buffers)


def _check_common(lr: float, weight_decay: float, trust_clip: float | None) -> None:
    if lr < 0:
        raise HyperparameterError(f"learning rate must be non-negative (got {lr})")
    if weight_decay < 0:
        raise HyperparameterError(f"weight_decay must be non-negative (got {weight_decay})")
    if trust_clip is not None and trust_clip <= 0:
        raise HyperparameterError(f"trust_clip must be positive or None (got {trust_clip})")


def build_dense_optimizer(
    named_parameters: Iterable[tuple[str, Tensor]],
    name: str,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    momentum: float,
    weight_decay: float,
    trust_clip: float | None = None,
    trust_coefficient: float = 1e-3,
) -> torch.optim.Optimizer:
    """The dense optimizer `name` over two param groups (biases/1-D without weight decay).

    adam: `torch.optim.Adam` (L2 added to the gradient); adamw: `torch.optim.AdamW` (decoupled
    decay); sgd: `torch.optim.SGD` with `momentum`; lamb: `Lamb` (betas, eps, trust_clip);
    lars: `Lars` (momentum, trust_coefficient, trust_clip). Arguments an optimizer does not use
    are ignored; `trust_clip` on a non-layer-wise optimizer is an error, not silently dropped.
    """
    if name not in DENSE_OPTIMIZERS:
        raise HyperparameterError(
            f"dense optimizer {name!r} is unknown; valid: {', '.join(DENSE_OPTIMIZERS)}"
        )
    if trust_clip is not None and name not in ("lamb", "lars"):
        raise HyperparameterError(f"trust_clip applies to lamb and lars only, not {name!r}")
    if name == "lamb":
        groups = lamb_lars_param_groups(named_parameters, weight_decay)
        return Lamb(groups, lr=lr, betas=betas, eps=eps, trust_clip=trust_clip)
    if name == "lars":
        groups = lamb_lars_param_groups(named_parameters, weight_decay)
        return Lars(
            groups,
            lr=lr,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
            trust_clip=trust_clip,
        )
    groups = weight_decay_param_groups(named_parameters, weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)
