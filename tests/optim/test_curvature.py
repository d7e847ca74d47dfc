"""CBLR and MCLR (the project's reading of Gao & Zhong 2020): LARS as CBLR's norm-ratio special
case, bit for bit, and a literal float64 reference of the secant rule with its fallbacks."""

from __future__ import annotations

import io
import statistics

import pytest
import torch
from torch import nn

from ctrscale.optim.dense.curvature import Cblr, Mclr
from ctrscale.optim.dense.optimizers import Lars, lamb_lars_param_groups
from ctrscale.optim.scaling import HyperparameterError

LRS = [1e-2, 2e-2, 5e-3, 1e-2, 3e-2]  # changes every step: the LR must sit inside the buffer
STEPS = len(LRS)
MOMENTUM, COEFFICIENT = 0.9, 1e-3


def initial_params() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "dense.weight": torch.randn(5, 3, generator=generator, dtype=torch.float64),
        "other.weight": 3.0 * torch.randn(3, 3, generator=generator, dtype=torch.float64),
        "zeros.weight": torch.zeros(4, 4, dtype=torch.float64),  # ‖w‖ = 0 at the first step
        "never_grad.weight": torch.randn(2, 3, generator=generator, dtype=torch.float64),
        "dense.bias": torch.randn(3, generator=generator, dtype=torch.float64),
    }


def gradients(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    grads = {
        name: torch.randn(p.shape, generator=generator, dtype=torch.float64)
        for name, p in initial_params().items()
    }
    grads["never_grad.weight"].zero_()  # Δg = 0 and ‖g‖ = 0: no usable estimate when β = 0
    if step == 3:
        grads["other.weight"].mul_(1e3)
    return grads


def excluded(name: str) -> bool:
    return name.endswith("bias")


def run(make, params=None, optimizer=None, first_step=1, last_step=STEPS):
    params = params or {n: nn.Parameter(p.clone()) for n, p in initial_params().items()}
    optimizer = optimizer or make(params.items())
    for t in range(first_step, last_step + 1):
        for name, g in gradients(t).items():
            params[name].grad = g
        for group in optimizer.param_groups:
            group["lr"] = LRS[t - 1]
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_cblr_with_norm_ratio_curvature_is_lars_bit_for_bit(weight_decay):
    def lars(named):
        groups = lamb_lars_param_groups(named, weight_decay)
        return Lars(groups, lr=LRS[0], momentum=MOMENTUM, trust_coefficient=COEFFICIENT)

    def cblr(named):
        groups = lamb_lars_param_groups(named, weight_decay)
        return Cblr(
            groups,
            lr=LRS[0],
            momentum=MOMENTUM,
            trust_coefficient=COEFFICIENT,
            curvature="norm_ratio",
        )

    expected, _ = run(lars)
    actual, _ = run(cblr)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def reference(rule: str, curvature: str, weight_decay: float) -> dict[str, torch.Tensor]:
    """The module docstring's rule, one tensor at a time in Python floats."""
    w = {name: p.clone() for name, p in initial_params().items()}
    buf = {name: torch.zeros_like(p) for name, p in w.items()}
    previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    beta = weight_decay
    for t, lr in enumerate(LRS, start=1):
        grads = gradients(t)
        kappa: dict[str, float | None] = {}
        for name in w:
            if excluded(name):
                continue
            g, x, estimate = grads[name], w[name], None
            if curvature == "secant" and name in previous:
                dg = (g - previous[name][0]).norm().item()
                dw = (x - previous[name][1]).norm().item()
                if dw > 0 and dg + beta * dw > 0:
                    estimate = dg / dw + beta
            if estimate is None:
                gn, wn = g.norm().item(), x.norm().item()
                if wn > 0 and gn + beta * wn > 0:
                    estimate = gn / wn + beta
            kappa[name] = estimate
            previous[name] = (g.clone(), x.clone())
        usable = [k for k in kappa.values() if k is not None]
        middle = statistics.median(usable) if usable else None
        for name in w:
            decay = 0.0 if excluded(name) else beta
            ratio = 1.0
            if not excluded(name) and kappa[name] is not None:
                ratio = (COEFFICIENT if rule == "cblr" else middle) / kappa[name]
            buf[name] = MOMENTUM * buf[name] + lr * ratio * (grads[name] + decay * w[name])
            w[name] = w[name] - buf[name]
    return w


def make(rule: str, curvature: str, weight_decay: float):
    def build(named):
        groups = lamb_lars_param_groups(named, weight_decay)
        if rule == "cblr":
            return Cblr(
                groups,
                lr=LRS[0],
                momentum=MOMENTUM,
                trust_coefficient=COEFFICIENT,
                curvature=curvature,
            )
        return Mclr(groups, lr=LRS[0], momentum=MOMENTUM, curvature=curvature)

    return build


@pytest.mark.parametrize("rule", ["cblr", "mclr"])
@pytest.mark.parametrize("curvature", ["secant", "norm_ratio"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_follows_the_literal_rule_over_several_steps(rule, curvature, weight_decay):
    actual, _ = run(make(rule, curvature, weight_decay))
    expected = reference(rule, curvature, weight_decay)
    for name in expected:
        torch.testing.assert_close(actual[name].detach(), expected[name], rtol=1e-10, atol=1e-14)


def test_secant_and_norm_ratio_give_different_iterates():
    """Guards the literal-rule test: the two estimates are not accidentally the same here."""
    secant, _ = run(make("cblr", "secant", 0.0))
    norm_ratio, _ = run(make("cblr", "norm_ratio", 0.0))
    assert not torch.allclose(secant["dense.weight"], norm_ratio["dense.weight"])


def test_secant_recovers_a_quadratic_layers_curvature_and_takes_the_newton_step():
    """f(w) = ½·a·‖w − w*‖²: Δg = a·Δw, so from step 2 on κ = a exactly and CBLR with c = 1,
    η = 1 and no momentum lands on w* (step 1 used the norm ratio ‖g‖/‖w‖ ≠ a)."""
    a, target = 4.0, torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    w = nn.Parameter(torch.tensor([[3.0, 5.0]], dtype=torch.float64))
    optimizer = Cblr([w], lr=1.0, momentum=0.0, trust_coefficient=1.0)
    w.grad = a * (w.detach() - target)
    optimizer.step()
    assert (w.detach() - target).norm() > 1.0
    w.grad = a * (w.detach() - target)
    optimizer.step()
    torch.testing.assert_close(w.detach(), target, rtol=0, atol=1e-14)


def test_secant_falls_back_to_the_norm_ratio_when_the_weights_did_not_move():
    """An LR of 0 at step 1 (a warm-up from 0) leaves Δw = 0: step 2 must use ‖g‖/‖w‖."""
    results = []
    for curvature in ("secant", "norm_ratio"):
        w = nn.Parameter(initial_params()["dense.weight"])
        optimizer = Cblr([w], lr=0.0, momentum=0.0, curvature=curvature)
        for t in (1, 2):
            w.grad = gradients(t)["dense.weight"]
            optimizer.param_groups[0]["lr"] = 0.0 if t == 1 else 0.1
            optimizer.step()
        results.append(w.detach())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], initial_params()["dense.weight"])


def test_mclr_gives_the_median_layer_the_global_lr():
    """Three layers with curvatures 1, 2 and 8, each in its own param group (the median runs
    over all of them): ρ = 2/1, 2/2 and 2/8 (no momentum, step 1)."""
    params = [nn.Parameter(torch.ones(2, 2, dtype=torch.float64)) for _ in range(3)]
    groups = [{"params": [p]} for p in params]
    optimizer = Mclr(groups, lr=0.1, momentum=0.0, curvature="norm_ratio")
    for p, kappa in zip(params, (1.0, 2.0, 8.0), strict=True):
        p.grad = kappa * torch.ones(2, 2, dtype=torch.float64)  # ‖g‖/‖w‖ = κ
    optimizer.step()
    steps = [1.0 - p[0, 0].item() for p in params]
    assert steps == pytest.approx([0.1 * 2.0 * 1.0, 0.1 * 1.0 * 2.0, 0.1 * 0.25 * 8.0], rel=1e-12)


@pytest.mark.parametrize("rule", ["cblr", "mclr"])
def test_state_dict_round_trip_continues_bitwise(rule):
    build = make(rule, "secant", 0.01)
    uninterrupted, _ = run(build)
    params, optimizer = run(build, last_step=2)
    checkpoint = io.BytesIO()
    torch.save(optimizer.state_dict(), checkpoint)
    checkpoint.seek(0)
    resumed = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    restored = build(resumed.items())
    restored.load_state_dict(torch.load(checkpoint))
    run(build, params=resumed, optimizer=restored, first_step=3)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


@pytest.mark.parametrize("cls", [Cblr, Mclr])
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"lr": -1.0}, "learning rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"momentum": 1.0}, "momentum"),
        ({"curvature": "hessian"}, "curvature"),
    ],
)
def test_hyperparameter_errors_name_the_argument(cls, kwargs, argument):
    with pytest.raises(HyperparameterError, match=argument):
        cls([nn.Parameter(torch.ones(2, 2))], **{"lr": 0.1, **kwargs})


def test_cblr_trust_coefficient_must_be_positive():
    with pytest.raises(HyperparameterError, match="trust_coefficient"):
        Cblr([nn.Parameter(torch.ones(2, 2))], lr=0.1, trust_coefficient=0.0)
