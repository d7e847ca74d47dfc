"""`DenseUpdate`: the optimizer of every non-embedding parameter and its LR schedule.

The dense parameters are data-parallel (DDP all-reduces their gradients in the backward);
the optimizer is `optim.dense` at the run's batch size, wrapped as TorchRec's
`KeyedOptimizer` so that its state dict is keyed by parameter names (checkpoints re-shard and
re-order freely). The LR of step t is the scaled LR × the schedule's multiplier of t, computed
from t alone, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from torchrec.optim.keyed import KeyedOptimizerWrapper

from ctrscale.config import DenseOptimConfig, ScheduleConfig
from ctrscale.optim.dense.optimizers import build_dense_optimizer
from ctrscale.optim.schedule import lr_multiplier


class DenseUpdate:
    def __init__(
        self,
        parameters: dict[str, nn.Parameter],
        config: DenseOptimConfig,
        schedule: ScheduleConfig,
        *,
        warmup_steps: int,
        total_steps: int,
    ) -> None:
        names_of = {id(p): n for n, p in parameters.items()}
        self.optimizer = KeyedOptimizerWrapper(
            parameters,
            lambda params: build_dense_optimizer(
                [(names_of[id(p)], p) for p in params],
                name=config.name,
                lr=config.lr,
                betas=config.betas,
                eps=config.eps,
                momentum=config.momentum,
                weight_decay=config.weight_decay,
                trust_clip=config.trust_clip,
                trust_coefficient=config.trust_coefficient,
                novograd_betas=config.novograd_betas,
                curvature=config.curvature,
            ),
        )
        self.config = config
        self._base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._multiplier = functools.partial(
            lr_multiplier,
            warmup_steps=warmup_steps,
            total_steps=max(total_steps, warmup_steps + 1),
            decay=schedule.decay,
            step_milestones=tuple(schedule.step_milestones),
            step_gamma=schedule.step_gamma,
            min_ratio=schedule.min_ratio,
        )

    def step(self, step: int) -> None:
        """Optimizer step number `step` (0-based), at the schedule's LR of that step."""
        factor = self._multiplier(step)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * factor
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def materialize_state(self) -> None:
        """Create lazily created state (Adam's moments before the first step) to load a
        checkpoint into; TorchRec does it with a zero-gradient step, so never before a save."""
        self.optimizer.init_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
