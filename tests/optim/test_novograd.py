"""NovoGrad per tensor, against the notes' hand-computed oracle (seed-methods.md) and a
literal float64 reference of the paper's Algorithm 1."""

from __future__ import annotations

import io
import math

import pytest
import pytorch_optimizer
import torch
from torch import nn

from ctrscale.optim.dense.novograd import NovoGrad
from ctrscale.optim.dense.optimizers import weight_decay_param_groups
from ctrscale.optim.scaling import HyperparameterError

W0, G1, G2 = [3.0, 4.0], [0.6, 0.8], [0.0, 2.0]
LRS = [0.1, 0.05, 0.2, 0.1, 0.1]
BETAS, EPS = (0.95, 0.98), 1e-8


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def steps(optimizer: torch.optim.Optimizer, param: nn.Parameter, grads) -> list[list[float]]:
    iterates = []
    for g in grads:
        param.grad = tensor(g)
        optimizer.step()
        iterates.append(param.detach().tolist())
    return iterates


def test_first_two_steps_match_the_oracle():
    w = nn.Parameter(tensor(W0))
    optimizer = NovoGrad([w], lr=0.1)
    w1, w2 = steps(optimizer, w, [G1, G2])
    assert w1 == pytest.approx([2.94, 3.92], abs=1e-6)
    assert optimizer.state[w]["exp_avg_sq"].item() == pytest.approx(1.06, abs=1e-12)
    assert w2 == pytest.approx([2.883, 3.649743], abs=1e-6)


def test_weight_decay_is_added_to_the_normalised_gradient():
    w = nn.Parameter(tensor(W0))
    (w1,) = steps(NovoGrad([w], lr=0.1, weight_decay=0.1), w, [G1])
    assert w1 == pytest.approx([2.91, 3.88], abs=1e-6)


def test_eps_sits_inside_the_square_root_unlike_pytorch_optimizer():
    """‖g‖² = ε: the paper's g/√(‖g‖²+ε) = g/√(2ε); ε outside the root would give ≈ g/√ε."""
    g = [math.sqrt(EPS), 0.0]
    ours = nn.Parameter(tensor([1.0, 1.0]))
    steps(NovoGrad([ours], lr=1.0, eps=EPS), ours, [g])
    assert 1.0 - ours[0].item() == pytest.approx(1 / math.sqrt(2), rel=1e-9)
    theirs = nn.Parameter(tensor([1.0, 1.0]))
    steps(pytorch_optimizer.NovoGrad([theirs], lr=1.0, eps=EPS), theirs, [g])
    assert 1.0 - theirs[0].item() == pytest.approx(1.0, rel=1e-3)


def test_step_reads_the_gradient_without_modifying_it():
    w = nn.Parameter(tensor(W0))
    w.grad = tensor(G1)
    NovoGrad([w], lr=0.1).step()
    assert w.grad.tolist() == G1


def initial_params() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "dense.weight": torch.randn(5, 3, generator=generator, dtype=torch.float64),
        "late.weight": torch.randn(2, 3, generator=generator, dtype=torch.float64),
        "zero_grad.weight": torch.randn(3, 3, generator=generator, dtype=torch.float64),
        "dense.bias": torch.randn(3, generator=generator, dtype=torch.float64),
    }


def gradient(step: int, name: str, shape: torch.Size) -> torch.Tensor | None:
    if name == "late.weight" and step < 3:
        return None  # a parameter whose first gradient comes at step 3: its own step 1 then
    if name == "zero_grad.weight":
        return torch.zeros(shape, dtype=torch.float64)  # v = 0: ε keeps it finite
    generator = torch.Generator().manual_seed(100 * step + len(name))
    scale = 1e3 if step == 4 else 1.0  # the normalisation must absorb a jump in scale
    return scale * torch.randn(shape, generator=generator, dtype=torch.float64)


def reference_novograd(weight_decay: float) -> dict[str, torch.Tensor]:
    """Algorithm 1, one tensor at a time, in plain float64 arithmetic."""
    beta1, beta2 = BETAS
    w = {name: p.clone() for name, p in initial_params().items()}
    m: dict[str, torch.Tensor] = {}
    v: dict[str, float] = {}
    for t, lr in enumerate(LRS, start=1):
        for name in w:
            g = gradient(t, name, w[name].shape)
            if g is None:
                continue
            d = 0.0 if name.endswith("bias") else weight_decay
            sq = float((g * g).sum())
            if name not in v:
                v[name] = sq
                m[name] = g / math.sqrt(v[name] + EPS) + d * w[name]
            else:
                v[name] = beta2 * v[name] + (1 - beta2) * sq
                m[name] = beta1 * m[name] + (g / math.sqrt(v[name] + EPS) + d * w[name])
            w[name] = w[name] - lr * m[name]
    return w


def run_novograd(weight_decay: float, optimizer=None, params=None, first_step=1, last_step=None):
    params = params or {n: nn.Parameter(p.clone()) for n, p in initial_params().items()}
    optimizer = optimizer or NovoGrad(
        weight_decay_param_groups(params.items(), weight_decay), lr=LRS[0], betas=BETAS, eps=EPS
    )
    for t in range(first_step, (last_step or len(LRS)) + 1):
        for name, p in params.items():
            p.grad = gradient(t, name, p.shape)
        for group in optimizer.param_groups:
            group["lr"] = LRS[t - 1]
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_follows_algorithm_1_per_tensor_over_several_steps(weight_decay):
    params, _ = run_novograd(weight_decay)
    expected = reference_novograd(weight_decay)
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-12, atol=1e-12)


def test_rule_equals_pytorch_optimizer_novograd_when_eps_is_negligible():
    """Same rule apart from ε (ε = 1e-30 here is below float64's resolution of v ≈ 1)."""
    ours = {n: nn.Parameter(p.clone()) for n, p in initial_params().items() if "zero" not in n}
    theirs = {n: nn.Parameter(p.clone()) for n, p in ours.items()}
    optimizers = (
        NovoGrad(weight_decay_param_groups(ours.items(), 0.01), lr=0.1, eps=1e-30),
        pytorch_optimizer.NovoGrad(
            weight_decay_param_groups(theirs.items(), 0.01), lr=0.1, eps=0.0, foreach=False
        ),
    )
    for t in range(1, 5):
        for params, optimizer in zip((ours, theirs), optimizers, strict=True):
            for name, p in params.items():
                g = gradient(t, name, p.shape)
                p.grad = None if g is None else g.clone()  # theirs divides .grad in place
            optimizer.step()
    for name in ours:
        torch.testing.assert_close(ours[name].detach(), theirs[name].detach(), rtol=1e-12, atol=0)


def test_state_dict_round_trip_continues_bitwise():
    uninterrupted, _ = run_novograd(0.01)
    params, optimizer = run_novograd(0.01, last_step=3)
    checkpoint = io.BytesIO()
    torch.save(optimizer.state_dict(), checkpoint)
    checkpoint.seek(0)
    resumed = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    restored = NovoGrad(weight_decay_param_groups(resumed.items(), 0.01), lr=LRS[0])
    restored.load_state_dict(torch.load(checkpoint))
    run_novograd(0.01, optimizer=restored, params=resumed, first_step=4)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"lr": -1.0}, "learning rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"betas": (1.0, 0.98)}, "betas"),
        ({"betas": (0.95, -0.1)}, "betas"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_hyperparameter_errors_name_the_argument(kwargs, argument):
    with pytest.raises(HyperparameterError, match=argument):
        NovoGrad([nn.Parameter(torch.ones(2))], **{"lr": 0.1, **kwargs})
