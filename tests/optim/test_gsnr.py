"""The GSNR gradient transform (VRGD): the notes' oracle, the bounds, degenerate variances, and a
literal re-implementation in front of SGD, Adam, LAMB and LARS over several steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctrscale.optim.dense.gsnr import GsnrTransform, gsnr, normalized_gsnr
from ctrscale.optim.dense.optimizers import Lamb, Lars, lamb_lars_param_groups
from ctrscale.optim.scaling import HyperparameterError


def statistics(*samples: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of the samples."""
    stacked = torch.tensor(samples, dtype=torch.float64)
    return stacked.mean(0), stacked.var(0, unbiased=False)


def test_oracle_samples_give_the_biased_variance_ratio():
    """[1, 1] and [3, −1]: μ = [2, 0], biased σ² = [1, 1] → r = [4, 0] (unbiased: [2, 0])."""
    ratio = gsnr(*statistics([1.0, 1.0], [3.0, -1.0]))
    assert ratio.tolist() == pytest.approx([4.0, 0.0], rel=1e-5)


def test_normalised_ratio_is_clipped_to_the_bounds():
    ratio = torch.tensor([0.0, 0.5, 1.0, 2.0, 6.5, 2.0], dtype=torch.float64)  # mean 2
    unclipped = [0.0, 0.25, 0.5, 1.0, 3.25, 1.0]
    assert normalized_gsnr(ratio, low=0.0, high=10.0).tolist() == unclipped
    assert normalized_gsnr(ratio, low=0.3, high=3.0).tolist() == [0.3, 0.3, 0.5, 1.0, 3.0, 1.0]


def test_zero_variance_and_zero_samples_stay_finite():
    """Identical samples (σ² = 0): r = 1/ε; all-zero samples: r = 0; μ = 0 everywhere:
    mean(r) = 0, and the scaled gradient is 0, not NaN."""
    identical = gsnr(*statistics([2.0, 0.0], [2.0, 0.0]), eps=1e-6)
    assert identical.tolist() == pytest.approx([1e6, 0.0])
    mean, variance = statistics([1.0, -1.0], [-1.0, 1.0])  # μ = 0, σ² = 1
    param = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    GsnrTransform().apply([param], [mean], [variance])
    assert param.grad.tolist() == [0.0, 0.0]


def test_ratio_does_not_change_with_the_loss_scale():
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(4, 50, generator=generator, dtype=torch.float64)
    samples[:, :5] = samples[:1, :5]  # some elements without variance
    small = gsnr(samples.mean(0), samples.var(0, unbiased=False))
    large = gsnr((1e-5 * samples).mean(0), (1e-5 * samples).var(0, unbiased=False))
    torch.testing.assert_close(large, small, rtol=1e-9, atol=0)


def test_apply_writes_the_scaled_mean_gradient():
    """Oracle: r = [4, 0], mean 2 → r̃ = [2, 0] → clipped [2, 0.1] → g̃ = r̃·μ = [4, 0]."""
    mean, variance = statistics([1.0, 1.0], [3.0, -1.0])
    fresh = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    held = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    held.grad = torch.full((2,), 7.0, dtype=torch.float64)
    grad_before = held.grad
    GsnrTransform(low=0.1, high=10.0).apply([fresh, held], [mean, mean], [variance, variance])
    assert fresh.grad.tolist() == pytest.approx([4.0, 0.0], rel=1e-5)
    assert held.grad is grad_before and held.grad.tolist() == fresh.grad.tolist()


def literal_gsnr_gradient(samples: torch.Tensor, low: float, high: float, eps: float):
    """From the stacked samples themselves, with torch's own (biased) variance."""
    mean = samples.mean(0)
    variance = samples.var(0, unbiased=False)
    second_moment = samples.square().mean(0)
    ratio = mean.square() / (variance + eps * second_moment)
    ratio = torch.nan_to_num(ratio, nan=0.0)
    return (ratio / ratio.mean()).clamp(low, high) * mean


BASES = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "lamb": lambda params: Lamb(lamb_lars_param_groups(params, 0.01), lr=0.01),
    "lars": lambda params: Lars(lamb_lars_param_groups(params, 0.01), lr=0.5),
}


def train(base: str, mode: str, steps: int = 4, k: int = 4) -> dict[str, torch.Tensor]:
    """k micro-batch gradients per step, fed to the base optimizer as the transform's g̃
    (`transform`), the literal formula's (`literal`) or their plain mean (`mean`)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    optimizer = BASES[base](list(model.named_parameters()))
    params = list(model.parameters())
    transform = GsnrTransform(low=0.2, high=5.0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(k, 8, 4, generator=generator, dtype=torch.float64)
        y = torch.randn(k, 8, 1, generator=generator, dtype=torch.float64)
        samples = [
            torch.autograd.grad(nn.functional.mse_loss(model(x[i]), y[i]), params) for i in range(k)
        ]
        stacked = [torch.stack([sample[j] for sample in samples]) for j in range(len(params))]
        if mode == "transform":
            means = [s.mean(0) for s in stacked]
            transform.apply(params, means, [s.var(0, unbiased=False) for s in stacked])
        for param, per_sample in zip(params, stacked, strict=True):
            if mode == "literal":
                param.grad = literal_gsnr_gradient(per_sample, 0.2, 5.0, transform.eps)
            elif mode == "mean":
                param.grad = per_sample.mean(0)
        optimizer.step()
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize("base", sorted(BASES))
def test_transform_in_front_of_a_base_optimizer_matches_a_literal_reimplementation(base):
    actual, expected = train(base, "transform"), train(base, "literal")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-10, atol=1e-13)
    # The scaling is not the identity on these gradients (else the comparison proves little).
    assert not torch.allclose(actual["0.weight"], train(base, "mean")["0.weight"])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"low": 2.0, "high": 1.0}, "low"),
        ({"low": -0.1}, "low"),
        ({"low": 0.0, "high": 0.0}, "high"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_hyperparameter_errors_name_the_argument(kwargs, argument):
    with pytest.raises(HyperparameterError, match=argument):
        GsnrTransform(**kwargs)
