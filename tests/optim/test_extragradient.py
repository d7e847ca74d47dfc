"""EXTRAP-SGD's extrapolation against the notes' oracle (seed-methods.md) and hand computations:
f(w) = ½·a·(w − c)², γ = η = 0.1, plain SGD as the base optimizer."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from ctrscale.optim.dense.extragradient import Extrapolation
from ctrscale.optim.scaling import HyperparameterError

GAMMA = LR = 0.1


def backward(w: nn.Parameter, a: float = 2.0, c: float = 0.0) -> None:
    (0.5 * a * (w - c).square()).sum().backward()


def test_local_extrapolation_matches_the_oracle():
    """w0 = 1, a = 2: w½ = 1 − 0.1·2 = 0.8, g' = 1.6 applied at w0: w1 = 0.84 (SGD: 0.8)."""
    w = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer, extrapolation = torch.optim.SGD([w], lr=LR), Extrapolation([w])
    backward(w)
    extrapolation.extrapolate(GAMMA)
    assert w.item() == pytest.approx(0.8, abs=1e-15)
    assert w.grad is None  # consumed: the second backward starts from zero
    backward(w)
    extrapolation.restore()
    assert w.item() == 1.0 and w.grad.item() == pytest.approx(1.6, abs=1e-15)
    optimizer.step()
    assert w.item() == pytest.approx(0.84, abs=1e-15)


def test_each_rank_extrapolates_with_its_own_local_gradient():
    """Two ranks, f_k = ½·a_k·(w − c_k)² with a = (1, 3), c = (0, 2), w0 = 1: rank 0 goes to
    0.9 (g' = 0.9), rank 1 to 1.3 (g' = −2.1); mean g' = −0.6, so w1 = 1.06. Extrapolating
    with the averaged gradient (−1) instead would give w1 = 1.08."""
    replicas = [nn.Parameter(torch.tensor([1.0], dtype=torch.float64)) for _ in range(2)]
    optimizers = [torch.optim.SGD([w], lr=LR) for w in replicas]
    extrapolations = [Extrapolation([w]) for w in replicas]
    functions = [(1.0, 0.0), (3.0, 2.0)]
    for w, extrapolation, (a, c) in zip(replicas, extrapolations, functions, strict=True):
        backward(w, a, c)  # local: no all-reduce
        extrapolation.extrapolate(GAMMA)
        backward(w, a, c)
    mean = torch.stack([w.grad for w in replicas]).mean(0)  # the all-reduce of g'
    for w, extrapolation, optimizer in zip(replicas, extrapolations, optimizers, strict=True):
        w.grad = mean.clone()
        extrapolation.restore()
        optimizer.step()
    assert [w.item() for w in replicas] == pytest.approx([1.06, 1.06], abs=1e-15)


def past_gradient_steps(steps: int, state=None, w0: float = 1.0) -> tuple[list[float], dict]:
    w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))
    optimizer, extrapolation = torch.optim.SGD([w], lr=LR), Extrapolation([w], past_gradient=True)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        extrapolation.load_state_dict(state["extrapolation"])
    iterates = []
    for _ in range(steps):
        extrapolation.extrapolate(GAMMA)
        backward(w)
        extrapolation.restore()
        optimizer.step()
        w.grad = None
        iterates.append(w.item())
    state = {"optimizer": optimizer.state_dict(), "extrapolation": extrapolation.state_dict()}
    return iterates, state


def test_past_gradient_variant_matches_hand_computation():
    """Step 1 has no past gradient: w½ = 1, g = 2, w1 = 0.8. Step 2: w½ = 0.8 − 0.1·2 = 0.6,
    g = 1.2, w2 = 0.68. Step 3: w½ = 0.68 − 0.12 = 0.56, g = 1.12, w3 = 0.568."""
    iterates, _ = past_gradient_steps(3)
    assert iterates == pytest.approx([0.8, 0.68, 0.568], abs=1e-15)


def test_past_gradient_state_round_trips_bitwise():
    uninterrupted, _ = past_gradient_steps(4)
    first, state = past_gradient_steps(2)
    checkpoint = io.BytesIO()
    torch.save(state, checkpoint)
    checkpoint.seek(0)
    resumed, _ = past_gradient_steps(2, state=torch.load(checkpoint), w0=first[-1])
    assert first + resumed == uninterrupted


def test_calls_out_of_order_and_negative_gamma_are_refused():
    w = nn.Parameter(torch.ones(1))
    extrapolation = Extrapolation([w])
    with pytest.raises(RuntimeError, match="without extrapolate"):
        extrapolation.restore()
    with pytest.raises(HyperparameterError, match="gamma"):
        extrapolation.extrapolate(-0.1)
    extrapolation.extrapolate(0.1)
    with pytest.raises(RuntimeError, match="twice"):
        extrapolation.extrapolate(0.1)
