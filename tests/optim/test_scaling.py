"""Batch-size scaling rules give the numbers the papers' rules prescribe."""

from __future__ import annotations

import math

import pytest

from ctrscale.config import load_config
from ctrscale.optim.scaling import (
    HyperparameterError,
    ResolvedHyperparameters,
    epochs_factor,
    regime_adaptation,
    resolve,
    resolve_hyperparameters,
)

# The CowClip paper's Criteo base setting at batch 1024 (LargeBatchCTR README).
BASE = {"base_batch_size": 1024, "embedding_lr": 1e-4, "embedding_l2": 1e-5, "dense_lr": 8e-4}
STEPS_PER_EPOCH = 350


def resolved(rule: str, batch_size: int, **overrides) -> ResolvedHyperparameters:
    arguments = {**BASE, "steps_per_epoch": STEPS_PER_EPOCH, **overrides}
    return resolve(rule, batch_size=batch_size, **arguments)


# (rule, batch_size, embedding_lr, embedding_l2, dense_lr, dense_warmup_steps)
EXPECTED = [
    ("none", 1024, 1e-4, 1e-5, 8e-4, 0),
    ("none", 8192, 1e-4, 1e-5, 8e-4, 0),
    ("none", 131072, 1e-4, 1e-5, 8e-4, 0),
    ("linear", 1024, 1e-4, 1e-5, 8e-4, 0),
    ("linear", 8192, 8e-4, 1e-5, 6.4e-3, 0),
    ("linear", 131072, 1.28e-2, 1e-5, 1.024e-1, 0),
    ("sqrt", 1024, 1e-4, 1e-5, 8e-4, 0),
    ("sqrt", 8192, 1e-4 * math.sqrt(8), 1e-5, 8e-4 * math.sqrt(8), 0),
    ("sqrt", 131072, 1e-4 * math.sqrt(128), 1e-5, 8e-4 * math.sqrt(128), 0),
    ("cowclip", 1024, 1e-4, 1e-5, 8e-4, STEPS_PER_EPOCH),
    ("cowclip", 8192, 1e-4, 8e-5, 8e-4 * math.sqrt(8), STEPS_PER_EPOCH),
    ("cowclip", 131072, 1e-4, 1.28e-3, 8e-4 * math.sqrt(128), STEPS_PER_EPOCH),
]


@pytest.mark.parametrize(
    ("rule", "batch_size", "embedding_lr", "embedding_l2", "dense_lr", "warmup"), EXPECTED
)
def test_rules_give_the_documented_numbers(
    rule, batch_size, embedding_lr, embedding_l2, dense_lr, warmup
):
    result = resolved(rule, batch_size)
    assert result.embedding_lr == pytest.approx(embedding_lr, rel=1e-12)
    assert result.embedding_l2 == pytest.approx(embedding_l2, rel=1e-12)
    assert result.dense_lr == pytest.approx(dense_lr, rel=1e-12)
    assert result.dense_warmup_steps == warmup
    assert result.scale == batch_size / 1024
    assert result.rule == rule


def test_cowclip_rule_reproduces_the_largebatchctr_commands():
    """README: `--bs 8192 --l2 8e-05 --lr 22.6274e-4` and
    `--bs 131072 --l2 128e-05 --lr 90.5096e-4`."""
    for batch_size, l2, lr in [(8192, 8e-5, 22.6274e-4), (131072, 128e-5, 90.5096e-4)]:
        result = resolved("cowclip", batch_size)
        assert result.embedding_l2 == pytest.approx(l2, rel=1e-12)
        assert result.dense_lr == pytest.approx(lr, rel=1e-6)
        assert result.embedding_lr == 1e-4


def test_explicit_warmup_overrides_the_rule_default():
    assert resolved("cowclip", 8192, warmup_steps=10).dense_warmup_steps == 10
    assert resolved("cowclip", 8192, warmup_steps=0).dense_warmup_steps == 0
    assert resolved("sqrt", 8192, warmup_steps=10).dense_warmup_steps == 10


def test_batch_sizes_that_are_not_multiples_scale_fractionally():
    result = resolved("linear", 1536)
    assert result.scale == 1.5
    assert result.dense_lr == pytest.approx(1.2e-3)


def test_as_dict_holds_every_field_for_saving_with_a_run():
    assert resolved("cowclip", 8192).as_dict() == {
        "embedding_lr": 1e-4,
        "embedding_l2": pytest.approx(8e-5),
        "dense_lr": pytest.approx(8e-4 * math.sqrt(8)),
        "dense_warmup_steps": STEPS_PER_EPOCH,
        "scale": 8.0,
        "rule": "cowclip",
    }


@pytest.mark.parametrize(
    ("rule", "batch_size", "overrides", "message"),
    [
        ("cubic", 8192, {}, "none, linear, sqrt, cowclip"),
        ("cowclip", 0, {}, "batch_size must be positive"),
        ("cowclip", 8192, {"base_batch_size": -1}, "base_batch_size must be positive"),
        ("cowclip", 8192, {"steps_per_epoch": 0}, "steps_per_epoch must be positive"),
        ("cowclip", 8192, {"dense_lr": 0.0}, "dense_lr must be positive"),
        ("cowclip", 8192, {"embedding_lr": -1.0}, "embedding_lr must be positive"),
        ("cowclip", 8192, {"embedding_l2": -1.0}, "embedding_l2 must be non-negative"),
        ("cowclip", 8192, {"warmup_steps": -1}, "warmup_steps must be non-negative"),
    ],
)
def test_invalid_inputs_raise_errors_naming_them(rule, batch_size, overrides, message):
    with pytest.raises(HyperparameterError, match=message):
        resolved(rule, batch_size, **overrides)


@pytest.mark.parametrize(
    ("settings", "l2"),
    [
        ([], 1e-5),  # lazy updates (the default): a row is pulled per look-up, not per step
        (['optim.embedding.semantics="dense"'], 8e-5),  # every row every step: the paper's × s
        (["optim.schedule.scale_l2=true"], 8e-5),
        (['optim.embedding.semantics="dense"', "optim.schedule.scale_l2=false"], 1e-5),
    ],
)
def test_cowclip_rule_scales_l2_where_every_row_is_pulled_every_step(settings, l2):
    config = load_config(None, ["data.batch_size=8192", *settings])
    hp = resolve_hyperparameters(config, steps_per_epoch=100, total_steps=1000)
    assert hp.embedding_l2 == pytest.approx(l2)


def test_the_warm_up_can_be_a_fraction_of_the_run():
    config = load_config(None, ["optim.schedule.warmup_fraction=0.1"])
    assert resolve_hyperparameters(config, 100, total_steps=1000).dense_warmup_steps == 100
    both = load_config(
        None, ["optim.schedule.warmup_fraction=0.1", "optim.schedule.warmup_steps=7"]
    )
    assert resolve_hyperparameters(both, 100, total_steps=1000).dense_warmup_steps == 7
    assert resolve_hyperparameters(load_config(), 100, 1000).dense_warmup_steps == 100  # 1 epoch


def test_regime_adaptation_keeps_the_number_of_updates():
    """ "Train longer": B 128 → 2,048, LR 0.1 → 0.4, 100 → 1,600 epochs, a drop at 50 → 800."""
    assert regime_adaptation(128, 2048, 0.1, 100, [50]) == (pytest.approx(0.4), 1600, [800])
    config = load_config(
        None,
        [
            'optim.schedule.rule="regime"',
            "optim.schedule.base_batch_size=128",
            "data.batch_size=2048",
            "optim.dense.lr=0.1",
            "optim.embedding.lr=0.1",
        ],
    )
    assert epochs_factor(config) == 16
    hp = resolve_hyperparameters(config, steps_per_epoch=10, total_steps=160)
    assert (hp.dense_lr, hp.embedding_lr) == (pytest.approx(0.4), pytest.approx(0.4))
    assert hp.embedding_l2 == pytest.approx(1e-5) and hp.dense_warmup_steps == 0
    assert epochs_factor(load_config(None, ["data.batch_size=2048"])) == 1  # other rules
