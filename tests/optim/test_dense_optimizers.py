"""LAMB, LAMBC and LARS against references written from the papers' formulas (float64) and the
notes' hand-computed oracle, and the optimizer factory's names and param-group rule."""

from __future__ import annotations

import io
import math

import pytest
import pytorch_optimizer
import torch
from torch import nn

from ctrscale.choices import DenseOptimizerName
from ctrscale.optim.dense.curvature import Cblr, Mclr
from ctrscale.optim.dense.novograd import NovoGrad
from ctrscale.optim.dense.optimizers import (
    Lamb,
    Lars,
    build_dense_optimizer,
    lamb_lars_param_groups,
    weight_decay_param_groups,
)
from ctrscale.optim.dense.sngm import Sngm
from ctrscale.optim.scaling import HyperparameterError

LRS = [1e-2, 2e-2, 5e-3, 1e-2, 3e-2]  # changes every step: the LR must enter where the paper says
BETAS, EPS, MOMENTUM, TRUST_COEFFICIENT = (0.9, 0.999), 1e-6, 0.9, 1e-3


def initial_params() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "dense.weight": torch.randn(5, 3, generator=generator, dtype=torch.float64),
        "zeros.weight": torch.zeros(4, 4, dtype=torch.float64),  # ‖w‖ = 0 at the first step
        "never_grad.weight": torch.randn(2, 3, generator=generator, dtype=torch.float64),
        "dense.bias": torch.randn(3, generator=generator, dtype=torch.float64),
    }


def gradients(step: int, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    grads = {
        name: torch.randn(p.shape, generator=generator, dtype=torch.float64)
        for name, p in params.items()
    }
    grads["never_grad.weight"].zero_()  # a parameter whose gradient is always exactly 0
    if step == 2:
        grads["dense.weight"].zero_()  # a zero gradient on a parameter that has momentum
    if step == 3:
        grads["dense.weight"].mul_(1e4)  # no hidden gradient-norm clipping may change this step
    return grads


def excluded(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.endswith("bias")


def reference_lamb(
    weight_decay: float, trust_clip: float | None, bias_correction: bool = True
) -> dict[str, torch.Tensor]:
    """You et al. 2020, Algorithm 2, one tensor at a time; without bias correction: LAMBC."""
    beta1, beta2 = BETAS
    x = {name: p.clone() for name, p in initial_params().items()}
    m = {name: torch.zeros_like(p) for name, p in x.items()}
    v = {name: torch.zeros_like(p) for name, p in x.items()}
    for t, lr in enumerate(LRS, start=1):
        grads = gradients(t, x)
        for name in x:
            g, lam = grads[name], 0.0 if excluded(name, x[name]) else weight_decay
            m[name] = beta1 * m[name] + (1 - beta1) * g
            v[name] = beta2 * v[name] + (1 - beta2) * g * g
            m_hat, v_hat = m[name], v[name]
            if bias_correction:
                m_hat, v_hat = m_hat / (1 - beta1**t), v_hat / (1 - beta2**t)
            update = m_hat / (v_hat.sqrt() + EPS) + lam * x[name]
            ratio = 1.0
            if not excluded(name, x[name]):
                w_norm, u_norm = x[name].norm().item(), update.norm().item()
                if w_norm > 0 and u_norm > 0:
                    ratio = w_norm / u_norm
                if trust_clip is not None:
                    ratio = min(ratio, trust_clip)
            x[name] = x[name] - lr * ratio * update
    return x


def reference_lars(weight_decay: float, trust_clip: float | None) -> dict[str, torch.Tensor]:
    """You, Gitman & Ginsburg 2017, Algorithm 1, one tensor at a time (global LR in the buffer)."""
    x = {name: p.clone() for name, p in initial_params().items()}
    buf = {name: torch.zeros_like(p) for name, p in x.items()}
    for t, lr in enumerate(LRS, start=1):
        grads = gradients(t, x)
        for name in x:
            g, beta = grads[name], 0.0 if excluded(name, x[name]) else weight_decay
            ratio = 1.0
            if not excluded(name, x[name]):
                w_norm = x[name].norm().item()
                denominator = g.norm().item() + beta * w_norm
                if w_norm > 0 and denominator > 0:
                    ratio = TRUST_COEFFICIENT * w_norm / denominator
                if trust_clip is not None:
                    ratio = min(ratio, trust_clip)
            buf[name] = MOMENTUM * buf[name] + lr * ratio * (g + beta * x[name])
            x[name] = x[name] - buf[name]
    return x


def run(make_optimizer, lrs=LRS) -> dict[str, torch.Tensor]:
    named = {name: nn.Parameter(p.clone()) for name, p in initial_params().items()}
    optimizer = make_optimizer(named.items())
    for t, lr in enumerate(lrs, start=1):
        grads = gradients(t, {name: p.detach() for name, p in named.items()})
        for name, p in named.items():
            p.grad = grads[name]
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    return {name: p.detach() for name, p in named.items()}


def assert_relative_error_at_most(actual, expected, tolerance=1e-6):
    for name in expected:
        error = (actual[name] - expected[name]).norm().item()
        scale = expected[name].norm().item()
        assert error <= tolerance * scale, f"{name}: ‖Δ‖={error:.3e}, ‖expected‖={scale:.3e}"


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("trust_clip", [None, 0.5])
def test_lamb_follows_algorithm_2(weight_decay, trust_clip):
    actual = run(
        lambda named: Lamb(
            lamb_lars_param_groups(named, weight_decay),
            lr=LRS[0],
            betas=BETAS,
            eps=EPS,
            trust_clip=trust_clip,
        )
    )
    assert_relative_error_at_most(actual, reference_lamb(weight_decay, trust_clip))
    assert actual["zeros.weight"].abs().sum() > 0  # ratio 1 at ‖w‖ = 0 lets it leave zero


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("trust_clip", [None, 1.0])
def test_lambc_is_lamb_without_bias_correction_and_with_a_clipped_ratio(weight_decay, trust_clip):
    actual = run(
        lambda named: Lamb(
            lamb_lars_param_groups(named, weight_decay),
            lr=LRS[0],
            betas=BETAS,
            eps=EPS,
            trust_clip=trust_clip,
            bias_correction=False,
        )
    )
    assert_relative_error_at_most(
        actual, reference_lamb(weight_decay, trust_clip, bias_correction=False)
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [("lamb", [2.964645, 4.035355]), ("lambc", [2.968379, 4.031622])],
)
def test_lamb_and_lambc_first_step_match_the_oracle(name, expected):
    """w = [3, 4], g = [0.6, −0.8], lr 0.01, ε = 1e-6: LAMB's ratio 5/√2 is applied; LAMBC's
    u = m/(√v+ε) has ‖u‖ ≈ √20, ratio 1.118086, clipped to c = 1."""
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))  # a matrix: layer-wise
    optimizer = build_dense_optimizer([("w", w)], name, 0.01, BETAS, 1e-6, MOMENTUM, 0.0)
    w.grad = torch.tensor([[0.6, -0.8]], dtype=torch.float64)
    optimizer.step()
    assert w.detach()[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_lamb_checkpoints_from_before_the_bias_correction_switch_load_as_bias_corrected():
    w = nn.Parameter(torch.ones(2, 2))
    state = Lamb([w], lr=0.1).state_dict()
    del state["param_groups"][0]["bias_correction"]
    restored = Lamb([w], lr=0.1, bias_correction=False)
    restored.load_state_dict(state)
    assert restored.param_groups[0]["bias_correction"] is True


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("trust_clip", [None, 5e-4])
def test_lars_follows_algorithm_1(weight_decay, trust_clip):
    actual = run(
        lambda named: Lars(
            lamb_lars_param_groups(named, weight_decay),
            lr=LRS[0],
            momentum=MOMENTUM,
            trust_coefficient=TRUST_COEFFICIENT,
            trust_clip=trust_clip,
        )
    )
    assert_relative_error_at_most(actual, reference_lars(weight_decay, trust_clip))


@pytest.mark.parametrize(
    ("reference", "trust_clip"), [(reference_lamb, 0.5), (reference_lars, 5e-4)]
)
def test_trust_clip_cases_actually_clip(reference, trust_clip):
    clipped, free = reference(0.01, trust_clip), reference(0.01, None)
    assert not torch.allclose(clipped["dense.weight"], free["dense.weight"])


def test_lamb_leaves_biases_to_plain_adam():
    """Excluded tensors get ρ = 1 and no decay: exactly torch's Adam (same bias correction)."""
    lamb = run(lambda named: Lamb(lamb_lars_param_groups(named, 0.1), lr=LRS[0], eps=EPS))
    adam = run(
        lambda named: torch.optim.Adam([p for name, p in named if name == "dense.bias"], eps=EPS)
    )
    assert_relative_error_at_most({"b": lamb["dense.bias"]}, {"b": adam["dense.bias"]}, 1e-12)


def test_lars_equals_pytorch_optimizer_lars_at_a_constant_lr():
    """The two differ only in where the global LR enters, which matters only when it changes."""
    weight_decay, constant = 0.01, [LRS[0]] * len(LRS)
    ours = run(
        lambda named: Lars(
            lamb_lars_param_groups(named, weight_decay), lr=LRS[0], momentum=MOMENTUM
        ),
        lrs=constant,
    )
    theirs = run(
        lambda named: pytorch_optimizer.LARS(
            weight_decay_param_groups(named, weight_decay),
            lr=LRS[0],
            momentum=MOMENTUM,
            trust_coefficient=TRUST_COEFFICIENT,
        ),
        lrs=constant,
    )
    assert_relative_error_at_most(ours, theirs, 1e-12)


@pytest.mark.parametrize("name", ["lamb", "lars", "lambc"])
def test_state_dict_round_trip_continues_identically(name):
    def make(named):
        return build_dense_optimizer(named, name, LRS[0], BETAS, EPS, MOMENTUM, 0.01)

    named = {n: nn.Parameter(p.clone()) for n, p in initial_params().items()}
    optimizer = make(named.items())
    for t in (1, 2):
        for n, g in gradients(t, initial_params()).items():
            named[n].grad = g
        optimizer.step()
    copies = {n: nn.Parameter(p.detach().clone()) for n, p in named.items()}
    restored = make(copies.items())
    checkpoint = io.BytesIO()
    torch.save(optimizer.state_dict(), checkpoint)
    checkpoint.seek(0)
    restored.load_state_dict(torch.load(checkpoint))
    for params, opt in ((named, optimizer), (copies, restored)):
        for n, g in gradients(3, initial_params()).items():
            params[n].grad = g
        opt.step()
    for n in named:
        assert torch.equal(named[n], copies[n]), n


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    model.register_parameter("frozen", nn.Parameter(torch.ones(2, 2), requires_grad=False))
    return model


@pytest.mark.parametrize("name", list(DenseOptimizerName))
def test_factory_keeps_weight_decay_off_biases_and_1d_parameters(name):
    model = small_model()
    optimizer = build_dense_optimizer(
        model.named_parameters(), name, 1e-3, (0.8, 0.99), 1e-7, 0.5, 0.05
    )
    decayed, excluded_group = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decayed["params"]) == ["0.weight", "2.weight"]
    assert sorted(names[id(p)] for p in excluded_group["params"]) == [
        "0.bias",
        "1.bias",
        "1.weight",  # LayerNorm scale: 1-D
        "2.bias",
    ]
    assert decayed["weight_decay"] == 0.05 and excluded_group["weight_decay"] == 0.0
    if name in ("lamb", "lars", "lambc", "cblr", "mclr"):
        assert decayed["trust_ratio"] and not excluded_group["trust_ratio"]


@pytest.mark.parametrize(
    ("name", "cls", "settings"),
    [
        ("adam", torch.optim.Adam, {"betas": (0.8, 0.99), "eps": 1e-7}),
        ("adamw", torch.optim.AdamW, {"betas": (0.8, 0.99), "eps": 1e-7}),
        ("sgd", torch.optim.SGD, {"momentum": 0.5}),
        (
            "lamb",
            Lamb,
            {"betas": (0.8, 0.99), "eps": 1e-7, "trust_clip": 2.0, "bias_correction": True},
        ),
        ("lars", Lars, {"momentum": 0.5, "trust_clip": 2.0, "trust_coefficient": 2e-3}),
        (
            "lambc",
            Lamb,
            {"betas": (0.8, 0.99), "eps": 1e-7, "trust_clip": 2.0, "bias_correction": False},
        ),
        ("novograd", NovoGrad, {"betas": (0.9, 0.95), "eps": 1e-7}),
        ("sngm", Sngm, {"momentum": 0.5}),
        ("cblr", Cblr, {"momentum": 0.5, "trust_coefficient": 2e-3, "curvature": "norm_ratio"}),
        ("mclr", Mclr, {"momentum": 0.5, "curvature": "norm_ratio"}),
    ],
)
def test_factory_passes_the_hyperparameters_through(name, cls, settings):
    trust_clip = 2.0 if name in ("lamb", "lars", "lambc") else None
    optimizer = build_dense_optimizer(
        small_model().named_parameters(),
        name,
        1e-3,
        (0.8, 0.99),
        1e-7,
        0.5,
        0.0,
        trust_clip,
        trust_coefficient=2e-3,
        novograd_betas=(0.9, 0.95),
        curvature="norm_ratio",
    )
    assert type(optimizer) is cls
    for group in optimizer.param_groups:
        assert group["lr"] == 1e-3
        assert {key: group[key] for key in settings} == settings


def test_factory_defaults_lambc_to_the_readme_clip_and_new_methods_to_their_papers():
    def build(name):
        return build_dense_optimizer(
            small_model().named_parameters(), name, 1e-3, BETAS, EPS, 0.9, 0
        )

    assert build("lambc").param_groups[0]["trust_clip"] == 1.0
    assert build("novograd").param_groups[0]["betas"] == (0.95, 0.98)
    assert build("cblr").param_groups[0]["curvature"] == "secant"
    assert build("mclr").param_groups[0]["curvature"] == "secant"


def test_factory_errors_name_the_problem():
    valid = "adam, adamw, sgd, lamb, lars, lambc, novograd, sngm, cblr, mclr"
    with pytest.raises(HyperparameterError, match=valid):
        build_dense_optimizer(small_model().named_parameters(), "adagrad", 1e-3, BETAS, EPS, 0, 0)
    with pytest.raises(HyperparameterError, match="trust_clip"):
        build_dense_optimizer(
            small_model().named_parameters(), "adam", 1e-3, BETAS, EPS, 0, 0, trust_clip=1.0
        )
    with pytest.raises(HyperparameterError, match="trust_clip"):
        Lamb([nn.Parameter(torch.ones(2, 2))], lr=1e-3, trust_clip=0.0)


def test_lamb_step_is_bounded_by_lr_times_weight_norm_whatever_the_gradient_scale():
    """ρ·‖u‖ = ‖w‖: the layer-wise step has norm η·‖w‖ (the property that makes LAMB work)."""
    p = nn.Parameter(torch.randn(8, 8, dtype=torch.float64))
    before = p.detach().clone()
    optimizer = Lamb([p], lr=0.1)
    p.grad = torch.randn(8, 8, dtype=torch.float64) * 1e8
    optimizer.step()
    assert math.isclose((p.detach() - before).norm().item(), 0.1 * before.norm().item())
