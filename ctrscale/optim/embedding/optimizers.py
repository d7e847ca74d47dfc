"""Embedding optimizers: how a table row changes, given its gradient row.

Each optimizer is one class holding two forms of the same update:
* the row form, `apply`: ctrscale updates the rows a batch looked up (lazy semantics) or every
  row (dense semantics) after the backward, from per-id gradient rows — on any device;
* optionally a fused form, `fused_kernels`: the FBGEMM kernel that applies the same update
  inside the TBE backward, used where the update needs nothing the kernel cannot do.

Adding an optimizer means one subclass here and its name in `EmbeddingOptimizerName`
(ctrscale/choices.py); `OPTIMIZERS` maps names to classes.

Why hand-written: no maintained library updates a subset of rows of a tensor that is not a
parameter of its own (FBGEMM's TBE weights), at O(rows in the batch). Each formula is
FBGEMM's kernel for the same name (tests compare the two on CPU where FBGEMM has the kernel).

State tensors are shaped like the weight — per-row state too, repeated over the row's
columns — so a checkpoint lays them out like the tables and re-shards them with them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import Tensor, nn

from ctrscale.choices import EmbeddingOptimizerName
from ctrscale.config import EmbeddingOptimConfig
from ctrscale.optim.dense.novograd import second_moments

State = dict[str, Tensor]


class EmbeddingOptimizer(ABC):
    """An optimizer of embedding rows; `config` holds the values at the run's batch size."""

    name: ClassVar[EmbeddingOptimizerName]
    state_names: ClassVar[tuple[str, ...]] = ()
    # FBGEMM kernel applying the same update inside the backward, by device type.
    fused_kernels: ClassVar[Mapping[str, EmbOptimType]] = MappingProxyType({})
    # Whether the update depends on the step count (bias correction).
    counts_steps: ClassVar[bool] = False
    # The row form's names of FBGEMM's element-wise state of the fused kernel, in the order of
    # `split_optimizer_states()`; None where FBGEMM's state has another shape (row-wise).
    fused_state_names: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, config: EmbeddingOptimConfig) -> None:
        self.config = config
        # Optimizer steps taken (Adam's bias correction; FBGEMM's `iter`); a CPU tensor so a
        # checkpoint loads into it in place and reading it never waits for a device.
        self.steps = torch.zeros((), dtype=torch.int64)

    @property
    def lr(self) -> float:
        return self.config.lr

    def fused_kernel(self, device_type: str) -> EmbOptimType | None:
        return self.fused_kernels.get(device_type)

    def fused_args(self) -> dict[str, Any]:
        """FBGEMM TBE arguments of the fused form (the kernel comes from `fused_kernel`)."""
        return {"learning_rate": self.lr}

    def new_state(self, weight: Tensor) -> State:
        # At least float32 whatever the weights' dtype: bf16/fp16 moments lose the update.
        dtype = torch.promote_types(weight.dtype, torch.float32)
        return {
            name: torch.zeros(weight.shape, dtype=dtype, device=weight.device)
            for name in self.state_names
        }

    def begin_step(self) -> None:
        self.steps += 1

    def keep_fused_step_count(self, tbe: nn.Module) -> None:
        """Make FBGEMM's fused kernel count steps as `apply` does. It takes bias correction's t
        from the TBE's own `iter`, which every forward advances — evaluation included — and
        which TorchRec's state dict does not hold, so a resumed run would restart at t = 1
        (FBGEMM 1.8 `SplitTableBatchedEmbeddingBagsCodegen.forward`: `iter_cpu` is synced from
        `iter` while 0, then both are incremented). Before each training forward both are set
        to `steps`, which checkpoints hold; the forward's increment then gives t = steps + 1,
        the t `apply` uses after `begin_step`. Host-side values only: no device sync."""
        if not self.counts_steps:
            return
        steps = self.steps

        def before_training_forward(module: nn.Module, args: tuple) -> None:
            if module.training and torch.is_grad_enabled():
                module.iter_cpu.fill_(int(steps))
                module.iter.fill_(int(steps))

        tbe.register_forward_pre_hook(before_training_forward)

    @abstractmethod
    def apply(self, weight: Tensor, state: State, rows: Tensor | None, grad: Tensor) -> None:
        """Update `weight[rows]` from its gradient rows `grad` ([n, width]; `rows` distinct,
        any index `weight[rows]` accepts); `rows=None`: every row, `grad` shaped like
        `weight`."""


def _gather(tensor: Tensor, rows: Tensor | None) -> Tensor:
    return tensor if rows is None else tensor[rows]


def _scatter(tensor: Tensor, rows: Tensor | None, values: Tensor) -> None:
    if rows is None:
        if values.data_ptr() != tensor.data_ptr():
            tensor.copy_(values)
    else:
        tensor[rows] = values


class Sgd(EmbeddingOptimizer):
    """w ← w − lr·g (FBGEMM EXACT_SGD)."""

    name = EmbeddingOptimizerName.SGD
    fused_kernels = MappingProxyType(
        {"cpu": EmbOptimType.EXACT_SGD, "cuda": EmbOptimType.EXACT_SGD}
    )

    @torch.no_grad()
    def apply(self, weight: Tensor, state: State, rows: Tensor | None, grad: Tensor) -> None:
        if rows is None:
            weight.sub_(grad, alpha=self.lr)
        else:
            weight[rows] -= self.lr * grad


class Adagrad(EmbeddingOptimizer):
    """s ← s + g²; w ← w − lr·g / (√s + ε), element-wise (FBGEMM EXACT_ADAGRAD)."""

    name = EmbeddingOptimizerName.ADAGRAD
    state_names = ("sum",)
    fused_kernels = MappingProxyType(
        {"cpu": EmbOptimType.EXACT_ADAGRAD, "cuda": EmbOptimType.EXACT_ADAGRAD}
    )
    fused_state_names = ("sum",)  # momentum1

    def fused_args(self) -> dict[str, Any]:
        return {**super().fused_args(), "eps": self.config.eps}

    @torch.no_grad()
    def apply(self, weight: Tensor, state: State, rows: Tensor | None, grad: Tensor) -> None:
        total = _gather(state["sum"], rows).addcmul_(grad, grad)
        _scatter(state["sum"], rows, total)
        step = grad / total.sqrt().add_(self.config.eps)
        _scatter(weight, rows, _gather(weight, rows).sub_(step, alpha=self.lr))


class RowwiseAdagrad(EmbeddingOptimizer):
    """s ← s + mean(g²) per row; w ← w − lr·g / (√s + ε) (FBGEMM EXACT_ROWWISE_ADAGRAD; the
    row's one accumulator is stored in each of its columns)."""

    name = EmbeddingOptimizerName.ROWWISE_ADAGRAD
    state_names = ("sum",)
    fused_kernels = MappingProxyType(
        {
            "cpu": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            "cuda": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        }
    )

    def fused_args(self) -> dict[str, Any]:
        return {**super().fused_args(), "eps": self.config.eps}

    @torch.no_grad()
    def apply(self, weight: Tensor, state: State, rows: Tensor | None, grad: Tensor) -> None:
        total = _gather(state["sum"], rows).add_(grad.square().mean(dim=-1, keepdim=True))
        _scatter(state["sum"], rows, total)
        step = grad / total.sqrt().add_(self.config.eps)
        _scatter(weight, rows, _gather(weight, rows).sub_(step, alpha=self.lr))


class Adam(EmbeddingOptimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1) with the run's step count t (one counter, as
    FBGEMM's `iter`, so an id's first update after a long absence is not inflated):

        m ← β1·m + (1−β1)·g;   v ← β2·v + (1−β2)·g²
        w ← w − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)

    FBGEMM fuses it on GPU only (its CPU TBE has no ADAM kernel)."""

    name = EmbeddingOptimizerName.ADAM
    state_names = ("exp_avg", "exp_avg_sq")
    fused_kernels = MappingProxyType({"cuda": EmbOptimType.ADAM})
    counts_steps = True
    fused_state_names = ("exp_avg", "exp_avg_sq")  # momentum1, momentum2

    def fused_args(self) -> dict[str, Any]:
        beta1, beta2 = self.config.betas
        return {**super().fused_args(), "eps": self.config.eps, "beta1": beta1, "beta2": beta2}

    @torch.no_grad()
    def apply(self, weight: Tensor, state: State, rows: Tensor | None, grad: Tensor) -> None:
        beta1, beta2 = self.config.betas
        t = int(self.steps)
        m = _gather(state["exp_avg"], rows).mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v = _gather(state["exp_avg_sq"], rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        _scatter(state["exp_avg"], rows, m)
        _scatter(state["exp_avg_sq"], rows, v)
        denominator = (v / (1.0 - beta2**t)).sqrt_().add_(self.config.eps)
        step = m / denominator
        _scatter(weight, rows, _gather(weight, rows).sub_(step, alpha=self.lr / (1.0 - beta1**t)))


class RowwiseNovoGrad(EmbeddingOptimizer):
    """NovoGrad (Ginsburg et al. 2019) with one second moment per row instead of per tensor —
    the project's reading for tables, as row-wise Adagrad is Adagrad's. Per row, with its
    gradient row g:

        v ← ‖g‖² at the row's first update (v = 0), else β2·v + (1−β2)·‖g‖²
        m ← β1·m + g / √(v + ε);   w ← w − lr·m

    No bias correction and no weight decay (L2 comes from `optim.embedding.l2`). On a
    column-wise shard ‖g‖ is over the shard's columns, as FBGEMM's row-wise Adagrad does."""

    name = EmbeddingOptimizerName.ROWWISE_NOVOGRAD
    state_names = ("exp_avg", "exp_avg_sq")

    @torch.no_grad()
    def apply(self, weight: Tensor, state: State, rows: Tensor | None, grad: Tensor) -> None:
        beta1, beta2 = self.config.novograd_betas
        sq_norms = grad.square().sum(dim=-1, keepdim=True)
        previous = _gather(state["exp_avg_sq"], rows)
        v = second_moments(previous, sq_norms.expand_as(previous), previous == 0, beta2)
        _scatter(state["exp_avg_sq"], rows, v)
        m = _gather(state["exp_avg"], rows).mul_(beta1).add_(grad / (v + self.config.eps).sqrt())
        _scatter(state["exp_avg"], rows, m)
        _scatter(weight, rows, _gather(weight, rows).sub_(m, alpha=self.lr))


OPTIMIZERS: dict[EmbeddingOptimizerName, type[EmbeddingOptimizer]] = {
    cls.name: cls for cls in (Sgd, Adagrad, RowwiseAdagrad, Adam, RowwiseNovoGrad)
}


def build_embedding_optimizer(config: EmbeddingOptimConfig) -> EmbeddingOptimizer:
    return OPTIMIZERS[config.name](config)
