"""`DenseUpdate`: the optimizer of every non-embedding parameter, its LR schedule, and the
gradient transform in front of it.

The dense parameters are data-parallel (DDP all-reduces their gradients in the backward);
the optimizer is `optim.dense` at the run's batch size, wrapped as TorchRec's
`KeyedOptimizer` so that its state dict is keyed by parameter names (checkpoints re-shard and
re-order freely). The LR of step t is the scaled LR × the schedule's multiplier of t, computed
from t alone, so a resumed run needs no scheduler state.

Transforms (`optim.dense.transform`) act on the dense parameters only — fused embedding
tables update inside or right after the backward, from the batch's gradient at w_t:
* gsnr: before the backward, `gsnr_statistics` takes k/N micro-batch gradients per rank from
  the step's graph; after it, `step` replaces the gradient by the GSNR-scaled mean of all k;
* extrapolation / past_extrapolation: the trainer moves the parameters to w' before the
  forward whose gradient is applied (`extrapolate`), and `step` moves them back to w_t first.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec.optim.keyed import KeyedOptimizerWrapper

from ctrscale.choices import GradientTransform
from ctrscale.config import DenseOptimConfig, ScheduleConfig
from ctrscale.optim.dense.extragradient import Extrapolation
from ctrscale.optim.dense.gsnr import GsnrTransform
from ctrscale.optim.dense.optimizers import build_dense_optimizer
from ctrscale.optim.scaling import HyperparameterError
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
        self.names = [n for n, p in parameters.items() if p.requires_grad]
        self.params = [parameters[n] for n in self.names]
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
        self.transform = config.transform
        self.gsnr = None
        self._gsnr_moments: tuple[list[Tensor], list[Tensor]] | None = None
        if self.transform == GradientTransform.GSNR:
            self.gsnr = GsnrTransform(*config.gsnr_bounds)
        self.extrapolation = None
        if self.transform in (
            GradientTransform.EXTRAPOLATION,
            GradientTransform.PAST_EXTRAPOLATION,
        ):
            past = self.transform == GradientTransform.PAST_EXTRAPOLATION
            self.extrapolation = Extrapolation(self.params, past_gradient=past)
            if past:  # no step yet: moving by zero is "step 1 does not move"
                self.extrapolation.load_state_dict(
                    {"past_gradients": [torch.zeros_like(p) for p in self.params]}
                )

    # ---- every step ----

    def lr_at(self, step: int) -> float:
        return self._base_lrs[0] * self._multiplier(step)

    def extrapolate(self, step: int, local_grads: list[Tensor | None] | None = None) -> None:
        """Move to w' = w − γ·d before the forward whose gradient `step` applies: d is this
        rank's local gradient (`local_grads`) or the previous step's gradient (past)."""
        if local_grads is not None:
            for param, grad in zip(self.params, local_grads, strict=True):
                param.grad = grad
        gamma = self.config.extrapolation_gamma
        self.extrapolation.extrapolate(self.lr_at(step) if gamma is None else gamma)

    def gsnr_statistics(self, per_sample_loss: Tensor, world_size: int) -> None:
        """Mean and variance of the k = `gsnr_samples` micro-batch gradients of the global
        batch, over every rank: this rank's k/N contiguous micro-batches of its rows (a rank's
        rows are a contiguous slice of the global batch, so 1 and N processes see the same k
        samples), each the gradient of its mean loss, from the step's graph. Two passes (the
        mean, then the deviations from it), each one all-reduce, keep the variance exact."""
        k = self.config.gsnr_samples
        if k % world_size:
            raise HyperparameterError(
                f"optim.dense.gsnr_samples={k} must be a multiple of the world size {world_size}"
            )
        samples = []
        for chunk in per_sample_loss.tensor_split(k // world_size):
            grads = torch.autograd.grad(
                chunk.mean(), self.params, retain_graph=True, allow_unused=True
            )
            samples.append(
                [
                    torch.zeros_like(p) if g is None else g
                    for p, g in zip(self.params, grads, strict=True)
                ]
            )
        means = _summed(_add_all(samples), world_size)
        for mean in means:
            mean.div_(k)
        deviations = [
            [(g - m).square() for g, m in zip(sample, means, strict=True)] for sample in samples
        ]
        variances = _summed(_add_all(deviations), world_size)
        for variance in variances:
            variance.div_(k)
        self._gsnr_moments = (means, variances)

    def step(self, step: int) -> None:
        """Optimizer step number `step` (0-based), at the schedule's LR of that step, after the
        transform (back to w_t from w', or the GSNR-scaled gradient) and the global-norm clip."""
        if self.extrapolation is not None:
            self.extrapolation.restore()
        if self.gsnr is not None:
            self.gsnr.apply(self.params, *self._gsnr_moments)
            self._gsnr_moments = None
        if self.config.clip_norm is not None:
            nn.utils.clip_grad_norm_(self.params, self.config.clip_norm)
        factor = self._multiplier(step)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * factor
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- checkpoints ----

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.transform == GradientTransform.PAST_EXTRAPOLATION:
            past = self.extrapolation.state_dict()["past_gradients"]
            state["past_gradients"] = dict(zip(self.names, past, strict=True))
        return state

    def materialize_state(self) -> None:
        """Create lazily created state (Adam's moments before the first step) to load a
        checkpoint into; TorchRec does it with a zero-gradient step, so never before a save."""
        self.optimizer.init_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "past_gradients" in state:  # loaded in place already; re-attach in order
            past = [state["past_gradients"][name] for name in self.names]
            self.extrapolation.load_state_dict({"past_gradients": past})


def _add_all(samples: list[list[Tensor]]) -> list[Tensor]:
    """Element-wise sum over samples, per parameter."""
    return [torch.stack(per_param).sum(0) for per_param in zip(*samples, strict=True)]


def _summed(tensors: list[Tensor], world_size: int) -> list[Tensor]:
    """`tensors` summed over every rank, in one all-reduce."""
    if world_size == 1:
        return tensors
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    pieces = flat.split([t.numel() for t in tensors])
    return [piece.view_as(t) for piece, t in zip(pieces, tensors, strict=True)]
