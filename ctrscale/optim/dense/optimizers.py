"""Optimizers of the dense (non-embedding) parameters, and `build_dense_optimizer`, the one
factory the config names: adam, adamw, sgd (torch), lamb, lars, lambc (here), novograd
(novograd.py), sngm (sngm.py), cblr and mclr (curvature.py).

Adam, AdamW and SGD are `torch.optim`'s. LAMB and LARS are written here with `torch._foreach`
ops because `pytorch_optimizer`'s (4.1) differ from the papers: its `Lamb` has no bias correction
(Algorithm 2 has it), clamps ‖w‖ to at most 10 and adds ε to ‖update‖ in the trust ratio; its
`LARS` applies the global LR outside the momentum buffer (the paper inside, which differs as soon
as the LR changes, e.g. during warm-up) and neither offers trust-ratio clipping. LAMBC is `Lamb`
without bias correction and with the trust ratio clipped (`bias_correction=False, trust_clip=c`).

Every optimizer gets two param groups (`weight_decay_param_groups`): weight matrices with the
weight decay, and biases / 1-D parameters (norm scales) without it; the layer-wise optimizers
(LAMB, LARS, LAMBC, CBLR, MCLR) also leave the latter out of layer-wise adaptation. No optimizer
here clips the global gradient norm.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ctrscale.choices import DenseOptimizerName, names
from ctrscale.optim.dense.base import (
    GroupwiseOptimizer,
    check_betas,
    check_common,
    check_fraction,
    check_positive,
    trust_ratios,
)
from ctrscale.optim.dense.curvature import Cblr, Mclr
from ctrscale.optim.dense.novograd import NOVOGRAD_BETAS, NovoGrad
from ctrscale.optim.dense.sngm import Sngm
from ctrscale.optim.scaling import HyperparameterError

Name = DenseOptimizerName
# Layer-wise adaptation (trust ratio or per-layer LR) on matrices, not on biases/1-D.
LAYERWISE = (Name.LAMB, Name.LARS, Name.LAMBC, Name.CBLR, Name.MCLR)
# The optimizers with a trust ratio that `trust_clip` caps.
TRUST_CLIPPED = (Name.LAMB, Name.LARS, Name.LAMBC)
# jeffrey-fong/LAMBC README: the clip bound c = 1 performed best in its experiments.
LAMBC_TRUST_CLIP = 1.0


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


class Lamb(GroupwiseOptimizer):
    """LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes", ICLR 2020, Algorithm 2), per parameter tensor x with gradient g at step t ≥ 1:

        m = β1·m + (1−β1)·g,          v = β2·v + (1−β2)·g²
        m̂ = m / (1−β1^t),             v̂ = v / (1−β2^t)          (bias correction, Algorithm 2)
        u = m̂ / (√v̂ + ε) + λ·x
        ρ = min(‖x‖ / ‖u‖, trust_clip)  (ρ = 1 if ‖x‖ = 0 or ‖u‖ = 0; no clip if trust_clip=None)
        x ← x − η·ρ·u

    φ of the paper is the identity. Groups with `trust_ratio=False` use ρ = 1 (plain Adam with
    L2-in-update λ, which `lamb_lars_param_groups` sets to 0 for them).

    LAMBC (Fong, Chen & Chen 2020, arXiv 2011.13584; code jeffrey-fong/LAMBC) is
    `bias_correction=False` (m̂ = m, v̂ = v, as that code and LAMB's arXiv v3) with
    `trust_clip=c` (c = 1 in its README).
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
        bias_correction: bool = True,
    ) -> None:
        check_common(lr, weight_decay, trust_clip)
        check_betas("LAMB", betas)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "trust_clip": trust_clip,
            "trust_ratio": trust_ratio,
            "bias_correction": bias_correction,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # Checkpoints from before the switch existed were all bias-corrected.
            group.setdefault("bias_correction", True)

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

        m_hat, denominators = exp_avgs, torch._foreach_sqrt(exp_avg_sqs)
        if group["bias_correction"]:
            m_hat = torch._foreach_div(m_hat, [1.0 - beta1 ** s["step"] for s in states])
            torch._foreach_div_(denominators, [(1.0 - beta2 ** s["step"]) ** 0.5 for s in states])
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


class Lars(GroupwiseOptimizer):
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
        check_common(lr, weight_decay, trust_clip)
        check_fraction("LARS", "momentum", momentum)
        check_positive("LARS", "trust_coefficient", trust_coefficient)
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
    novograd_betas: tuple[float, float] = NOVOGRAD_BETAS,
    curvature: str = "secant",
) -> torch.optim.Optimizer:
    """The dense optimizer `name` over two param groups (biases/1-D without weight decay).

    adam: `torch.optim.Adam` (L2 added to the gradient); adamw: `torch.optim.AdamW` (decoupled
    decay); sgd: `torch.optim.SGD` with `momentum`; lamb: `Lamb` (betas, eps, trust_clip);
    lars: `Lars` (momentum, trust_coefficient, trust_clip); lambc: `Lamb` without bias
    correction, `trust_clip` defaulting to `LAMBC_TRUST_CLIP`; novograd: `NovoGrad`
    (novograd_betas, eps); sngm: `Sngm` (momentum); cblr: `Cblr` (momentum, trust_coefficient,
    curvature); mclr: `Mclr` (momentum, curvature). `weight_decay` applies to the matrices only,
    in each optimizer's own form (see its class). Arguments an optimizer does not use are
    ignored; `trust_clip` on an optimizer without a trust ratio is an error, not silently
    dropped.
    """
    if name not in tuple(DenseOptimizerName):
        raise HyperparameterError(
            f"dense optimizer {name!r} is unknown; valid: {names(DenseOptimizerName)}"
        )
    if trust_clip is not None and name not in TRUST_CLIPPED:
        raise HyperparameterError(
            f"trust_clip applies to {', '.join(TRUST_CLIPPED)} only, not {name}"
        )
    if name in LAYERWISE:
        groups = lamb_lars_param_groups(named_parameters, weight_decay)
    else:
        groups = weight_decay_param_groups(named_parameters, weight_decay)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps, trust_clip=trust_clip)
    if name == "lambc":
        clip = LAMBC_TRUST_CLIP if trust_clip is None else trust_clip
        return Lamb(groups, lr=lr, betas=betas, eps=eps, trust_clip=clip, bias_correction=False)
    if name == "lars":
        return Lars(
            groups,
            lr=lr,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
            trust_clip=trust_clip,
        )
    if name == "cblr":
        return Cblr(
            groups,
            lr=lr,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
            curvature=curvature,
        )
    if name == "mclr":
        return Mclr(groups, lr=lr, momentum=momentum, curvature=curvature)
    if name == "novograd":
        return NovoGrad(groups, lr=lr, betas=novograd_betas, eps=eps)
    if name == "sngm":
        return Sngm(groups, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)
