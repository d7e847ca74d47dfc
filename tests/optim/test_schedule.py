"""LR multipliers at the boundaries of warm-up and decay."""

from __future__ import annotations

import math

import pytest

from ctrscale.optim.scaling import HyperparameterError
from ctrscale.optim.schedule import lr_multiplier


def test_linear_warmup_then_constant():
    def multiplier(step):
        return lr_multiplier(step, warmup_steps=4, total_steps=100, decay="constant")

    assert [multiplier(step) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert multiplier(10_000) == 1.0  # constant even past total_steps


def test_no_warmup_starts_at_full_lr():
    assert lr_multiplier(0, warmup_steps=0, total_steps=10, decay="constant") == 1.0


def test_cosine_runs_from_one_after_warmup_to_min_ratio_at_total_steps():
    def multiplier(step):
        return lr_multiplier(step, warmup_steps=10, total_steps=110, decay="cosine", min_ratio=0.1)

    assert multiplier(0) == pytest.approx(0.1)  # warm-up: (0+1)/10
    assert multiplier(9) == pytest.approx(1.0)  # last warm-up step
    assert multiplier(10) == pytest.approx(1.0)  # cosine progress 0
    assert multiplier(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert multiplier(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert multiplier(110) == pytest.approx(0.1)
    assert multiplier(500) == pytest.approx(0.1)  # stays at the floor


def test_cosine_without_floor_reaches_zero():
    assert lr_multiplier(20, warmup_steps=0, total_steps=20, decay="cosine") == pytest.approx(0.0)


def test_step_decay_multiplies_by_gamma_at_each_milestone():
    def multiplier(step):
        return lr_multiplier(
            step,
            warmup_steps=2,
            total_steps=100,
            decay="step",
            step_milestones=(5, 8),
            step_gamma=0.5,
        )

    expected = {0: 0.5, 1: 1.0, 4: 1.0, 5: 0.5, 7: 0.5, 8: 0.25, 99: 0.25}
    assert {step: multiplier(step) for step in expected} == expected


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"decay": "linear"}, "constant, cosine, step"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"decay": "cosine", "warmup_steps": 10, "total_steps": 10}, "total_steps"),
        ({"decay": "step", "step_milestones": (8, 5)}, "increasing"),
        ({"decay": "step", "step_gamma": 0.0}, "step_gamma"),
        ({"decay": "cosine", "min_ratio": 1.5}, "min_ratio"),
    ],
)
def test_invalid_schedules_raise_errors_naming_the_setting(arguments, message):
    settings = {"warmup_steps": 0, "total_steps": 100, "decay": "constant", **arguments}
    with pytest.raises(HyperparameterError, match=message):
        lr_multiplier(0, **settings)
