"""SNGM against the notes' oracle (seed-methods.md), its loss-scale invariance, and a literal
float64 reference over several steps."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from ctrscale.optim.dense.optimizers import weight_decay_param_groups
from ctrscale.optim.dense.sngm import Sngm, global_norm
from ctrscale.optim.scaling import HyperparameterError

CURVATURES = torch.tensor([1.0, 10.0], dtype=torch.float64)  # f(w) = ½·wᵀ·diag(1, 10)·w


def quadratic_iterates(scale: float, split: bool, steps: int = 2) -> torch.Tensor:
    """SNGM on scale·f from w0 = [1, 1], η = 0.1, β = 0.9; with `split` each coordinate is its
    own parameter in its own param group."""
    if split:
        params = [nn.Parameter(torch.ones(1, dtype=torch.float64)) for _ in range(2)]
        optimizer = Sngm([{"params": [p]} for p in params], lr=0.1, momentum=0.9)
    else:
        params = [nn.Parameter(torch.ones(2, dtype=torch.float64))]
        optimizer = Sngm(params, lr=0.1, momentum=0.9)
    iterates = []
    for _ in range(steps):
        w = torch.cat([p.detach() for p in params])
        for p, g in zip(params, (scale * CURVATURES * w).split(params[0].numel()), strict=True):
            p.grad = g.clone()
        optimizer.step()
        iterates.append(torch.cat([p.detach() for p in params]))
    return torch.stack(iterates)


def test_first_two_steps_match_the_oracle():
    w1, w2 = quadratic_iterates(scale=1.0, split=False).tolist()
    assert w1 == pytest.approx([0.990050, 0.900496], abs=1e-6)
    assert w2 == pytest.approx([0.970166, 0.711542], abs=1e-6)


def test_norm_is_global_over_every_parameter_and_group():
    """The same oracle with one scalar parameter per group: a per-tensor or per-group norm
    would step each coordinate by η instead."""
    torch.testing.assert_close(
        quadratic_iterates(scale=1.0, split=True),
        quadratic_iterates(scale=1.0, split=False),
        rtol=1e-15,
        atol=0,
    )


def test_iterates_do_not_depend_on_the_loss_scale():
    torch.testing.assert_close(
        quadratic_iterates(scale=100.0, split=False, steps=6),
        quadratic_iterates(scale=1.0, split=False, steps=6),
        rtol=1e-13,
        atol=0,
    )


LRS = [0.1, 0.05, 0.2, 0.1]
STEPS = len(LRS)
MOMENTUM = 0.8


def initial_params() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "dense.weight": torch.randn(4, 3, generator=generator, dtype=torch.float64),
        "other.weight": torch.randn(2, 2, generator=generator, dtype=torch.float64),
        "dense.bias": torch.randn(3, generator=generator, dtype=torch.float64),
    }


def gradients(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(10 + step)
    grads = {
        name: torch.randn(p.shape, generator=generator, dtype=torch.float64)
        for name, p in initial_params().items()
    }
    if step == 3:
        grads["other.weight"].mul_(1e3)  # one layer dominates the global norm this step
    return grads


def reference_sngm(weight_decay: float) -> dict[str, torch.Tensor]:
    """u ← β·u + d/‖d‖, d = g + λ·w with ‖d‖ over all tensors, w ← w − η·u."""
    w = {name: p.clone() for name, p in initial_params().items()}
    u = {name: torch.zeros_like(p) for name, p in w.items()}
    for t, lr in enumerate(LRS, start=1):
        grads = gradients(t)
        d = {
            name: grads[name] + (0.0 if name.endswith("bias") else weight_decay) * w[name]
            for name in w
        }
        norm = torch.cat([x.flatten() for x in d.values()]).norm()
        for name in w:
            u[name] = MOMENTUM * u[name] + d[name] / norm
            w[name] = w[name] - lr * u[name]
    return w


def run_sngm(weight_decay, optimizer=None, params=None, first_step=1, last_step=STEPS):
    params = params or {n: nn.Parameter(p.clone()) for n, p in initial_params().items()}
    optimizer = optimizer or Sngm(
        weight_decay_param_groups(params.items(), weight_decay), lr=LRS[0], momentum=MOMENTUM
    )
    for t in range(first_step, last_step + 1):
        for name, g in gradients(t).items():
            params[name].grad = g
        for group in optimizer.param_groups:
            group["lr"] = LRS[t - 1]
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_follows_the_rule_over_several_steps_with_decay_added_before_normalising(weight_decay):
    params, _ = run_sngm(weight_decay)
    expected = reference_sngm(weight_decay)
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-12, atol=1e-14)


def test_extra_sq_norm_joins_the_global_norm():
    """Two optimizers over halves of the parameters, each told the other's squared gradient
    norm (as an all-reduce from sharded parameters would), step exactly like one over all."""
    together, _ = run_sngm(0.0)
    params = {n: nn.Parameter(p.clone()) for n, p in initial_params().items()}
    names = list(params)
    halves = (names[:1], names[1:])

    def sq_norm_of(selected):
        return lambda: sum(float(params[n].grad.square().sum()) for n in selected)

    optimizers = [
        Sngm([params[n] for n in half], lr=0.1, momentum=MOMENTUM, extra_sq_norm=sq_norm_of(other))
        for half, other in (halves, halves[::-1])
    ]
    for t, lr in enumerate(LRS, start=1):
        for name, g in gradients(t).items():
            params[name].grad = g
        for optimizer in optimizers:
            optimizer.param_groups[0]["lr"] = lr
        for optimizer in optimizers:
            optimizer.step()
    for name in names:
        torch.testing.assert_close(
            params[name].detach(), together[name].detach(), rtol=1e-12, atol=0
        )


def test_zero_gradient_continues_on_momentum_without_nan():
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = Sngm([w], lr=0.1, momentum=0.5)
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    optimizer.step()  # u = [0.6, 0.8]
    w.grad = torch.zeros(2, dtype=torch.float64)
    optimizer.step()  # u = [0.3, 0.4]
    assert w.detach().tolist() == pytest.approx([3.0 - 0.09, 4.0 - 0.12], abs=1e-12)


def test_global_norm_adds_the_extra_squared_norm():
    norm = global_norm([torch.tensor([3.0]), torch.tensor([[4.0]])], extra_sq_norm=11.0)
    assert norm.item() == pytest.approx(6.0)


def test_state_dict_round_trip_continues_bitwise():
    uninterrupted, _ = run_sngm(0.05)
    params, optimizer = run_sngm(0.05, last_step=2)
    checkpoint = io.BytesIO()
    torch.save(optimizer.state_dict(), checkpoint)
    checkpoint.seek(0)
    resumed = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    restored = Sngm(weight_decay_param_groups(resumed.items(), 0.05), lr=LRS[0])
    restored.load_state_dict(torch.load(checkpoint))
    run_sngm(0.05, optimizer=restored, params=resumed, first_step=3)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"lr": -1.0}, "learning rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
    ],
)
def test_hyperparameter_errors_name_the_argument(kwargs, argument):
    with pytest.raises(HyperparameterError, match=argument):
        Sngm([nn.Parameter(torch.ones(2))], **{"lr": 0.1, **kwargs})
