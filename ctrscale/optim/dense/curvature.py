"""CBLR and MCLR: layer-wise learning rates from a per-layer curvature estimate (Gao & Zhong,
"Study on the Large Batch Size Training of Neural Networks Based on the Second Order
Gradient", arXiv 2012.08795).

Only the paper's abstract was available (no algorithm text or code found), so the rule below is
the project's reading of it: "a curvature-based learning rate (CBLR) ... across layers",
"the median-curvature LR (MCLR) ... comparable performance to LARS", "LARS ... special
instances of CBLR". Per trust-ratio tensor (layer) l with gradient g and weights w:

    κ_l = ‖g_t − g_{t−1}‖ / ‖w_t − w_{t−1}‖ + β     curvature="secant" (default)
    κ_l = ‖g_t‖ / ‖w_t‖ + β                          curvature="norm_ratio"
    CBLR:  ρ_l = c / κ_l                 MCLR:  ρ_l = median over layers of κ / κ_l
    v ← μ·v + η·ρ_l·(g + β·w);   w ← w − v          (η the group's lr, inside the buffer as LARS)

β is the L2 weight decay: the curvature of the L2 term (β/2)‖w‖² is exactly β, so it is added
to the estimate of the loss's curvature. With curvature="norm_ratio", CBLR is LARS exactly:
c/κ_l = c·‖w‖/(‖g‖ + β‖w‖) is LARS's trust ratio with c its trust coefficient (a test).

An estimate is used only where its denominator ‖Δw‖ (or ‖w‖) and its κ are positive, as LARS
uses its ratio: the secant falls back to the norm ratio at step 1 (no previous step), when the
weights did not move (e.g. an LR of 0 in the previous step) or the gradient did not change
with β = 0; where the norm ratio is undefined too (‖w‖ = 0, or ‖g‖ = 0 with β = 0) ρ_l = 1,
i.e. the layer gets η. MCLR's median (the mean of the two middle values for an even count)
runs over the layers with a usable κ. Tensors with `trust_ratio=False` (biases/1-D from
`lamb_lars_param_groups`) get ρ = 1. With stochastic gradients ‖g_t − g_{t−1}‖ also holds the
noise of two batches, so the secant overestimates the curvature when steps are small; large
batches (the paper's setting) reduce that noise.

State per trust-ratio tensor: the momentum buffer, plus the previous gradient and weights for
the secant (checkpointed, so a resumed run continues the same estimates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ctrscale.optim.dense.base import (
    GroupwiseOptimizer,
    check_common,
    check_fraction,
    check_positive,
    evaluate,
    trust_ratios,
)
from ctrscale.optim.scaling import HyperparameterError

CURVATURES = ("secant", "norm_ratio")


def usable(run: Tensor, rise: Tensor) -> Tensor:
    """Where κ = rise/run is an estimate to use: both positive."""
    return (run > 0) & (rise > 0)


def layer_curvatures(run: Tensor, rise: Tensor) -> Tensor:
    """κ = rise/run of the layers where it is usable (1-D, in layer order)."""
    keep = usable(run, rise)
    return rise[keep] / run[keep]


def median(values: Tensor) -> Tensor:
    """The median; the mean of the two middle values for an even count."""
    return torch.quantile(values, 0.5)


class _CurvatureSgd(GroupwiseOptimizer):
    """SGD with momentum (LR inside the buffer, as LARS) and per-layer ratios ρ_l."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        name = type(self).__name__.upper()
        check_common(defaults["lr"], defaults["weight_decay"])
        check_fraction(name, "momentum", defaults["momentum"])
        if defaults["curvature"] not in CURVATURES:
            raise HyperparameterError(
                f"{name} curvature must be one of {', '.join(CURVATURES)} "
                f"(got {defaults['curvature']!r})"
            )
        super().__init__(params, defaults)

    def _ratios(
        self, groups: list[dict[str, Any]], estimates: list[tuple[Tensor, Tensor]]
    ) -> list[list[Tensor]]:
        """ρ per tensor of each trust-ratio group, from its (run, rise) estimates."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = evaluate(closure)
        selected = self.groups_with_grads()
        trusted = [(group, params) for group, params in selected if group["trust_ratio"]]
        estimates = [self._estimate(group, params) for group, params in trusted]
        ratios = self._ratios([group for group, _ in trusted], estimates)
        by_group = {id(group): r for (group, _), r in zip(trusted, ratios, strict=True)}
        for group, params in selected:
            self._momentum_step(group, params, by_group.get(id(group)))
        return loss

    def _estimate(self, group: dict[str, Any], params: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(run, rise) per tensor, κ = rise/run = ‖Δg‖/‖Δw‖ + β or ‖g‖/‖w‖ + β (see the module
        docstring), and the secant's state moved on to this step's g and w."""
        grads = [p.grad for p in params]
        weight_decay = group["weight_decay"]
        run = torch.stack(torch._foreach_norm(params))
        rise = torch.stack(torch._foreach_norm(grads))
        if group["curvature"] == "secant":
            previous_grads, previous_params = self._previous(params)
            secant_run = torch.stack(
                torch._foreach_norm(torch._foreach_sub(params, previous_params))
            )
            secant_rise = torch.stack(
                torch._foreach_norm(torch._foreach_sub(grads, previous_grads))
            )
            secant = usable(secant_run, secant_rise + weight_decay * secant_run)
            run = torch.where(secant, secant_run, run)
            rise = torch.where(secant, secant_rise, rise)
            torch._foreach_copy_(previous_grads, grads)
            torch._foreach_copy_(previous_params, params)
        return run, rise + run * weight_decay

    def _previous(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The secant's previous g and w; at a tensor's first step, copies of the current ones
        (Δw = 0: the estimate falls back to the norm ratio)."""
        for p in params:
            state = self.state[p]
            if "previous_grad" not in state:
                state["previous_grad"] = p.grad.clone()
                state["previous_param"] = p.detach().clone()
        return (
            [self.state[p]["previous_grad"] for p in params],
            [self.state[p]["previous_param"] for p in params],
        )

    def _momentum_step(
        self, group: dict[str, Any], params: list[Tensor], ratios: list[Tensor] | None
    ) -> None:
        scaled = torch._foreach_add([p.grad for p in params], params, alpha=group["weight_decay"])
        if ratios is not None:
            torch._foreach_mul_(scaled, ratios)
        buffers = []
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers.append(self.state[p]["momentum_buffer"])
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, scaled, alpha=group["lr"])
        torch._foreach_sub_(params, buffers)


class Cblr(_CurvatureSgd):
    """CBLR: ρ_l = c/κ_l with c = `trust_coefficient` (LARS's η, default 1e-3 as LARS) — see
    the module docstring for κ_l, the fallbacks and the update."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        curvature: str = "secant",
        trust_ratio: bool = True,
    ) -> None:
        check_positive("CBLR", "trust_coefficient", trust_coefficient)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "curvature": curvature,
            "trust_ratio": trust_ratio,
        }
        super().__init__(params, defaults)

    def _ratios(
        self, groups: list[dict[str, Any]], estimates: list[tuple[Tensor, Tensor]]
    ) -> list[list[Tensor]]:
        return [
            trust_ratios(list(run * group["trust_coefficient"]), list(rise), None)
            for group, (run, rise) in zip(groups, estimates, strict=True)
        ]


class Mclr(_CurvatureSgd):
    """MCLR: ρ_l = median_l(κ)/κ_l over every trust-ratio tensor of the optimizer (all groups),
    so the median layer steps with exactly η and no trust coefficient is needed — see the
    module docstring for κ_l, the fallbacks and the update."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        curvature: str = "secant",
        trust_ratio: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "curvature": curvature,
            "trust_ratio": trust_ratio,
        }
        super().__init__(params, defaults)

    def _ratios(
        self, groups: list[dict[str, Any]], estimates: list[tuple[Tensor, Tensor]]
    ) -> list[list[Tensor]]:
        if not estimates:
            return []
        kappas = torch.cat([layer_curvatures(run, rise) for run, rise in estimates])
        # Without a usable κ every ratio is 1 whatever the median: any positive value will do.
        middle = median(kappas) if kappas.numel() else 1.0
        return [trust_ratios(list(run * middle), list(rise), None) for run, rise in estimates]
