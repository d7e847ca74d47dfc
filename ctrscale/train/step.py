"""The sharded model with its two updates, and one training step.

`build_trainer` is everything between a config and a model ready to step: the hyperparameters
of the run's batch size (scaling rule), the model, the embedding update (which decides how
table rows change and what FBGEMM fuses), the sharding plan, the deterministic table
initialisation, and the dense update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel

from ctrscale.choices import GradientTransform
from ctrscale.config import Config
from ctrscale.distributed.context import DistContext
from ctrscale.distributed.sharding import initialize_tables, shard_model
from ctrscale.models import build_model
from ctrscale.optim.dense.update import DenseUpdate
from ctrscale.optim.embedding.update import EmbeddingUpdate
from ctrscale.optim.scaling import ResolvedHyperparameters, resolve_hyperparameters, scaled
from ctrscale.train.discard import local_kept_rows
from ctrscale.train.precision import dtype_name, forward_logits, resolve_precision


@dataclass
class Trainer:
    dmp: DistributedModelParallel
    embedding: EmbeddingUpdate
    dense: DenseUpdate
    hyperparameters: ResolvedHyperparameters
    ctx: DistContext
    config: Config  # as given, before batch-size scaling: what checkpoints record
    table_sizes: dict[str, int]
    precision: torch.dtype  # of the dense tower (precision.py)
    precision_reason: str

    def step(self, batch: Batch, global_rows: int, step: int) -> torch.Tensor:
        """Optimizer step number `step` on this rank's share of the global-batch mean loss;
        returns the local loss sum.

        DDP averages dense gradients over ranks, and TorchRec divides the embedding gradients
        it sends back through the all-to-all by the world size too (its `gradient_division`),
        so each rank back-propagates N × (its loss sum) / (global rows): the averaged gradients
        then equal the single-process gradient of the global batch's mean loss, also when the
        last batch leaves ranks with unequal rows.
        """
        self.dense.zero_grad()
        self._extrapolate(batch, step)
        logits = forward_logits(self.dmp, batch, self.precision)
        losses = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        trained, rows = self._discard_small_losses(losses, global_rows)
        if self.dense.gsnr is not None:
            self.dense.gsnr_statistics(trained, self.ctx.world_size)
        (trained.sum() * (self.ctx.world_size / rows)).backward()
        self.embedding.after_backward(global_rows)
        self.dense.step(step)
        return losses.detach().sum()

    def _discard_small_losses(self, losses: torch.Tensor, global_rows: int):
        """The per-row losses the gradient comes from, and how many rows they are: all, or
        all but the ⌊q·B⌋ smallest of the global batch (`train.discard_fraction` = q)."""
        fraction = self.config.train.discard_fraction
        if fraction == 0:
            return losses, global_rows
        kept = local_kept_rows(losses, fraction, self.ctx.rank, self.ctx.world_size)
        return losses * kept, global_rows - math.floor(fraction * global_rows)

    def _extrapolate(self, batch: Batch, step: int) -> None:
        """EXTRAP-SGD: move the dense parameters to w' for the step's gradient. The local
        variant needs this rank's own gradient at w_t first: a forward and a backward to the
        dense parameters only (the embedding tables are neither extrapolated nor updated by
        it, and no gradient is all-reduced)."""
        if self.dense.transform == GradientTransform.PAST_EXTRAPOLATION:
            self.dense.extrapolate(step)
        elif self.dense.transform == GradientTransform.EXTRAPOLATION:
            logits = forward_logits(self.dmp, batch, self.precision)
            local = F.binary_cross_entropy_with_logits(logits, batch.labels)
            grads = torch.autograd.grad(local, self.dense.params, allow_unused=True)
            self.dense.extrapolate(step, list(grads))

    @torch.no_grad()
    def all_finite(self) -> bool:
        """Every parameter, every rank's table shards included, is finite (checked before a
        checkpoint is written: a diverged model must never replace a good one)."""
        finite = True
        for value in self.dmp.state_dict().values():
            tensors = (
                [shard.tensor for shard in value.local_shards()]
                if isinstance(value, ShardedTensor)
                else [value]
            )
            finite = finite and all(bool(torch.isfinite(t).all()) for t in tensors)
        flag = torch.tensor([1.0 if finite else 0.0], device=self.ctx.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def clip_counts(self) -> tuple[Any, Any]:
        """Ids CowClip scaled down and ids it saw since the last call, on this rank."""
        return self.embedding.clip_counter.take()

    def learning_rates(self) -> dict[str, float]:
        return {"embedding": self.embedding.learning_rate, "dense": self.dense.learning_rate}

    def describe(self) -> dict[str, Any]:
        """The hyperparameters the run really uses, as `hyperparameters.json` records them."""
        return {
            **self.hyperparameters.as_dict(),
            "embedding": self.embedding.describe(),
            "dense": {
                "optimizer": self.dense.config.name.value,
                "lr": self.dense.config.lr,
                "transform": self.dense.transform.value,
            },
            "precision": dtype_name(self.precision),
            "precision_reason": self.precision_reason,
        }

    def state_tensors(self, with_optimizer: bool = True) -> dict[str, Any]:
        """What a checkpoint holds (sharded tensors included), as DCP saves and loads it."""
        model = self.dmp.state_dict()
        tensors: dict[str, Any] = {"model": model}
        if with_optimizer:
            tensors["dense_optim"] = self.dense.state_dict()
            tensors["embedding_optim"] = self.embedding.state_tensors(
                model, self.dmp.fused_optimizer
            )
        return tensors

    def tensors_to_load(self, with_optimizer: bool) -> dict[str, Any]:
        if with_optimizer:
            self.dense.materialize_state()
        return self.state_tensors(with_optimizer)

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        """After DCP has loaded into `tensors_to_load()`'s tensors: hand them to their owners
        (row optimizer state was loaded in place)."""
        self.dmp.load_state_dict(tensors["model"])
        if "dense_optim" in tensors:
            self.dense.load_state_dict(tensors["dense_optim"])
            self.embedding.load_fused_state(tensors["embedding_optim"], self.dmp.fused_optimizer)


def module_path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("the embedding collection is not a submodule of the model")


def build_trainer(
    config: Config,
    ctx: DistContext,
    table_sizes: dict[str, int],
    *,
    steps_per_epoch: int,
    total_steps: int,
) -> Trainer:
    hyperparameters = resolve_hyperparameters(config, steps_per_epoch, total_steps)
    optim = scaled(config.optim, hyperparameters)
    model = build_model(config.model, table_sizes, dense_device=ctx.device)
    ebc = model.embedding_bag_collection
    embedding_prefix = module_path(model, ebc)
    tables = ebc.embedding_bag_configs()
    embedding = EmbeddingUpdate(
        optim.embedding, optim.cowclip, config.distributed.sharding_type, ctx.device
    )
    dmp = shard_model(
        model,
        ebc,
        ctx,
        sharding_type=config.distributed.sharding_type,
        fused_params=embedding.fused_params(),
        local_batch_size=config.data.batch_size // ctx.world_size,
        column_shard_dim=config.distributed.column_shard_dim,
    )
    initialize_tables(dmp, tables, embedding_prefix, config.train.seed)
    embedding.attach(dmp, {t.embedding_dim for t in tables}, model.first_order_tables)
    dense_parameters = {
        name: param
        for name, param in dmp.named_parameters()
        if not name.startswith(embedding_prefix + ".")
    }
    dense = DenseUpdate(
        dense_parameters,
        optim.dense,
        optim.schedule,
        warmup_steps=hyperparameters.dense_warmup_steps,
        total_steps=total_steps,
    )
    precision, reason = resolve_precision(config.train.precision, ctx.device)
    return Trainer(
        dmp, embedding, dense, hyperparameters, ctx, config, dict(table_sizes), precision, reason
    )
