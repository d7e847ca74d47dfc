"""Batch-size scaling rules: how learning rates, L2 and warm-up change with the batch size.

With s = batch_size / base_batch_size:

- `none`:    nothing changes.
- `linear`:  every learning rate × s (Goyal et al., 2017).
- `sqrt`:    every learning rate × √s (Krizhevsky, 2014; Hoffer et al., 2017).
- `cowclip`: embedding LR unchanged, embedding L2 × s, dense LR × √s, the dense LR warmed up
  linearly over the first epoch (Zheng et al., AAAI 2023, Sec. 4 and the LargeBatchCTR
  README: Criteo 1K → 128K keeps lr_embed 1e-4, l2 1e-5·s, lr 8e-4·√s, warmup 1).

  L2 × s compensates for s× fewer steps when every row is pulled at every step, which is what
  the official code does (dense semantics). Under lazy updates a row is pulled once per step
  that looks it up — about as often at any batch size for rare ids — so × s pulls it s× harder
  at the same frequency. ctrscale therefore scales L2 only under dense semantics unless
  `optim.schedule.scale_l2` says otherwise (docs/results/large-batch-gap measures both: × s
  under lazy updates costs 0.7 AUC points at ×128).

- `regime`: "train longer" (Hoffer, Hubara & Soudry, NeurIPS 2017): every learning rate
  × √s and the epochs × ⌈s⌉, so the run makes as many updates as at the base batch (LR-drop
  milestones, counted in steps, then fall on the same updates); combine with a global
  gradient-norm clip (`optim.dense.clip_norm`, the paper's code uses 5) and ghost batch norm
  (`model.batch_norm`, `model.ghost_batch_size`).

A rule sets learning rates, L2, warm-up (and `regime` the epochs) only; whether the clip runs
is `optim.cowclip.mode`. The warm-up applies to the dense LR; embedding LRs are never warmed
up (as in LargeBatchCTR).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ctrscale.choices import ScalingRule, UpdateSemantics, names
from ctrscale.config import Config, OptimConfig
from ctrscale.errors import CtrscaleError


class HyperparameterError(CtrscaleError, ValueError):
    """An optimizer hyperparameter that cannot be used; the message names it."""


@dataclass(frozen=True)
class ResolvedHyperparameters:
    """The hyperparameters a run actually uses at its batch size (saved with the run)."""

    embedding_lr: float
    embedding_l2: float
    dense_lr: float
    dense_warmup_steps: int
    scale: float
    rule: ScalingRule

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise HyperparameterError(message)


def resolve(
    rule: ScalingRule,
    base_batch_size: int,
    batch_size: int,
    embedding_lr: float,
    embedding_l2: float,
    dense_lr: float,
    steps_per_epoch: int,
    warmup_steps: int | None = None,
    scale_l2: bool = True,
) -> ResolvedHyperparameters:
    """Scale base-batch hyperparameters to `batch_size` by `rule` (see the module docstring).

    `embedding_lr`, `embedding_l2` and `dense_lr` are the values tuned at `base_batch_size`;
    `steps_per_epoch` counts steps at `batch_size`. The dense warm-up is `warmup_steps` when
    given, else one epoch for `cowclip` and none for the other rules. `scale_l2`: whether the
    `cowclip` rule multiplies L2 by s.
    """
    _require(
        rule in tuple(ScalingRule),
        f"scaling rule {rule!r} is unknown; valid rules: {names(ScalingRule)}",
    )
    rule = ScalingRule(rule)
    _require(base_batch_size > 0, f"base_batch_size must be positive (got {base_batch_size})")
    _require(batch_size > 0, f"batch_size must be positive (got {batch_size})")
    _require(steps_per_epoch > 0, f"steps_per_epoch must be positive (got {steps_per_epoch})")
    _require(embedding_lr > 0, f"embedding_lr must be positive (got {embedding_lr})")
    _require(dense_lr > 0, f"dense_lr must be positive (got {dense_lr})")
    _require(embedding_l2 >= 0, f"embedding_l2 must be non-negative (got {embedding_l2})")
    _require(
        warmup_steps is None or warmup_steps >= 0,
        f"warmup_steps must be non-negative (got {warmup_steps})",
    )

    scale = batch_size / base_batch_size
    lr_factor = {
        ScalingRule.NONE: 1.0,
        ScalingRule.LINEAR: scale,
        ScalingRule.SQRT: math.sqrt(scale),
        ScalingRule.REGIME: math.sqrt(scale),
    }
    if rule == ScalingRule.COWCLIP:
        return ResolvedHyperparameters(
            embedding_lr=embedding_lr,
            embedding_l2=embedding_l2 * scale if scale_l2 else embedding_l2,
            dense_lr=dense_lr * math.sqrt(scale),
            dense_warmup_steps=steps_per_epoch if warmup_steps is None else warmup_steps,
            scale=scale,
            rule=rule,
        )
    return ResolvedHyperparameters(
        embedding_lr=embedding_lr * lr_factor[rule],
        embedding_l2=embedding_l2,
        dense_lr=dense_lr * lr_factor[rule],
        dense_warmup_steps=warmup_steps or 0,
        scale=scale,
        rule=rule,
    )


def regime_adaptation(
    base_batch_size: int, batch_size: int, lr: float, epochs: int, milestones: list[int]
) -> tuple[float, int, list[int]]:
    """ "Train longer"'s regime at `batch_size` from one tuned at `base_batch_size`: the LR
    × √s, the epochs and the LR-drop milestones (in epochs) × ⌈s⌉."""
    scale = batch_size / base_batch_size
    factor = math.ceil(scale)
    return lr * math.sqrt(scale), epochs * factor, [m * factor for m in milestones]


def epochs_factor(config: Config) -> int:
    """How many times `train.epochs` the run trains: ⌈s⌉ under `regime`, else 1."""
    schedule = config.optim.schedule
    if schedule.rule != ScalingRule.REGIME:
        return 1
    return math.ceil(config.data.batch_size / schedule.base_batch_size)


def resolve_hyperparameters(
    config: Config, steps_per_epoch: int, total_steps: int
) -> ResolvedHyperparameters:
    """The run's values: `config.optim`'s base-batch values scaled to `data.batch_size`."""
    optim = config.optim
    schedule = optim.schedule
    warmup_steps = schedule.warmup_steps
    if warmup_steps is None and schedule.warmup_fraction is not None:
        warmup_steps = round(schedule.warmup_fraction * total_steps)
    scale_l2 = schedule.scale_l2
    if scale_l2 is None:
        scale_l2 = optim.embedding.semantics == UpdateSemantics.DENSE
    return resolve(
        optim.schedule.rule,
        base_batch_size=optim.schedule.base_batch_size,
        batch_size=config.data.batch_size,
        embedding_lr=optim.embedding.lr,
        embedding_l2=optim.embedding.l2,
        dense_lr=optim.dense.lr,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=warmup_steps,
        scale_l2=scale_l2,
    )


def scaled(optim: OptimConfig, hp: ResolvedHyperparameters) -> OptimConfig:
    """`optim` with the learning rates and L2 of the run's batch size."""
    embedding = optim.embedding.model_copy(update={"lr": hp.embedding_lr, "l2": hp.embedding_l2})
    dense = optim.dense.model_copy(update={"lr": hp.dense_lr})
    return optim.model_copy(update={"embedding": embedding, "dense": dense})
