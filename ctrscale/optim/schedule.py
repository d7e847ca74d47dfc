"""Learning-rate schedules: linear warm-up, then constant, cosine or step decay.

The multiplier of step t (0-based, the t-th optimizer step) is warm-up(t) × decay(t):

- warm-up(t) = (t+1)/W for t < W, else 1 (W = `warmup_steps`; the first step already moves,
  the W-th step reaches the full LR; Goyal et al., 2017, gradual warm-up);
- `constant`: decay(t) = 1;
- `cosine`:   decay(t) = m + (1−m)·½(1 + cos(π·p)), p = clamp((t−W)/(T−W), 0, 1), reaching
  m = `min_ratio` at T = `total_steps` (Loshchilov & Hutter, SGDR, without restarts);
- `step`:     decay(t) = γ^k, k = the number of milestones ≤ t (γ = `step_gamma`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from ctrscale.optim.scaling import HyperparameterError

Decay = Literal["constant", "cosine", "step"]
DECAYS = ("constant", "cosine", "step")


def _validate(
    warmup_steps: int,
    total_steps: int,
    decay: str,
    step_milestones: Sequence[int],
    step_gamma: float,
    min_ratio: float,
) -> None:
    problems = []
    if decay not in DECAYS:
        problems.append(f"decay {decay!r} is unknown; valid: {', '.join(DECAYS)}")
    if warmup_steps < 0:
        problems.append(f"warmup_steps must be non-negative (got {warmup_steps})")
    if decay == "cosine" and total_steps <= warmup_steps:
        problems.append(
            f"cosine decay needs total_steps ({total_steps}) > warmup_steps ({warmup_steps})"
        )
    if list(step_milestones) != sorted(step_milestones):
        problems.append(f"step_milestones must be increasing (got {list(step_milestones)})")
    if step_gamma <= 0:
        problems.append(f"step_gamma must be positive (got {step_gamma})")
    if not 0.0 <= min_ratio <= 1.0:
        problems.append(f"min_ratio must be in [0, 1] (got {min_ratio})")
    if problems:
        raise HyperparameterError("; ".join(problems))


def lr_multiplier(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    decay: Decay,
    step_milestones: Sequence[int] = (),
    step_gamma: float = 0.1,
    min_ratio: float = 0.0,
) -> float:
    """The factor on the base LR at optimizer step `step` (0-based); see the module docstring."""
    _validate(warmup_steps, total_steps, decay, step_milestones, step_gamma, min_ratio)
    if step < 0:
        raise HyperparameterError(f"step must be non-negative (got {step})")
    warmup = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    if decay == "cosine":
        progress = min(max((step - warmup_steps) / (total_steps - warmup_steps), 0.0), 1.0)
        return warmup * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    if decay == "step":
        return warmup * step_gamma ** sum(step >= milestone for milestone in step_milestones)
    return warmup
