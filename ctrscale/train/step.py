"""The sharded model, its optimizers and gradient rewriting, and one training step.

`build_trainer` is everything between a config and a model ready to step: the hyperparameters
of the run's batch size (scaling rule), the model, its sharding plan, the deterministic table
initialisation, the optimizers and the embedding-gradient hooks (L2, CowClip).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel

from ctrscale.config import Config
from ctrscale.distributed.context import DistContext
from ctrscale.distributed.sharding import (
    has_fused_adam,
    initialize_tables,
    shard_model,
    sharded_like_weights,
)
from ctrscale.models import build_model
from ctrscale.optim.builder import (
    RunOptimizers,
    build_optimizers,
    gradient_rule,
    module_path,
    resolve_hyperparameters,
    scaled,
)
from ctrscale.optim.embedding_grad import EmbeddingGradientTransform
from ctrscale.optim.row_adam import RowAdam
from ctrscale.optim.scaling import ResolvedHyperparameters


@dataclass
class Trainer:
    dmp: DistributedModelParallel
    optimizers: RunOptimizers
    gradients: EmbeddingGradientTransform | None
    hyperparameters: ResolvedHyperparameters
    ctx: DistContext

    def step(self, batch: Batch, global_rows: int, step: int) -> torch.Tensor:
        """Optimizer step number `step` on this rank's share of the global-batch mean loss;
        returns the local loss sum.

        DDP averages dense gradients over ranks, and TorchRec divides the embedding gradients
        it sends back through the all-to-all by the world size too (its `gradient_division`),
        so each rank back-propagates N × (its loss sum) / (global rows): the averaged gradients
        then equal the single-process gradient of the global batch's mean loss, also when the
        last batch leaves ranks with unequal rows.
        """
        self.optimizers.zero_grad()
        logits = self.dmp(batch.dense_features, batch.sparse_features)
        loss_sum = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum")
        (loss_sum * (self.ctx.world_size / global_rows)).backward()
        if self.gradients is not None:
            self.gradients.after_backward(global_rows, self.ctx.device)
        self.optimizers.step(step)
        return loss_sum.detach()

    @property
    def row_adam(self) -> RowAdam | None:
        return None if self.gradients is None else self.gradients.row_adam

    def learning_rates(self) -> dict[str, float]:
        rates = self.optimizers.learning_rates()
        if self.row_adam is not None:
            rates["embedding"] = self.row_adam.lr
        return rates

    def state_tensors(self, with_optimizer: bool = True) -> dict[str, Any]:
        """What a checkpoint holds (sharded tensors included), as DCP saves and loads it."""
        model = self.dmp.state_dict()
        tensors: dict[str, Any] = {"model": model}
        if with_optimizer:
            tensors["optim"] = self.optimizers.combined.state_dict()
            if self.row_adam is not None:
                tensors["row_adam"] = {
                    "step": self.row_adam.step,
                    **sharded_like_weights(model, self.gradients.moment_shards),
                }
        return tensors


def build_trainer(
    config: Config,
    ctx: DistContext,
    table_sizes: dict[str, int],
    *,
    steps_per_epoch: int,
    total_steps: int,
) -> Trainer:
    hyperparameters = resolve_hyperparameters(config, steps_per_epoch)
    optim = scaled(config.optim, hyperparameters)
    model = build_model(config.model, table_sizes, dense_device=ctx.device)
    embedding_prefix = module_path(model, model.embedding_bag_collection)
    tables = model.embedding_bag_collection.embedding_bag_configs()
    dmp = shard_model(
        model,
        model.embedding_bag_collection,
        ctx,
        sharding_type=config.distributed.sharding_type,
        optim=optim,
        local_batch_size=config.data.batch_size // ctx.world_size,
        column_shard_dim=config.distributed.column_shard_dim,
    )
    initialize_tables(dmp, tables, embedding_prefix, config.train.seed)
    optimizers = build_optimizers(
        dmp, embedding_prefix, optim, hyperparameters.dense_warmup_steps, total_steps
    )
    rule = gradient_rule(optim, {t.embedding_dim for t in tables}, model.first_order_tables)
    row_adam = None
    if optim.embedding.name == "adam":
        beta1, beta2 = optim.embedding.betas
        row_adam = RowAdam(optim.embedding.lr, beta1, beta2, optim.embedding.eps)
    gradients = EmbeddingGradientTransform.install(
        dmp, rule, row_adam, fused_adam=has_fused_adam(ctx.device)
    )
    return Trainer(dmp, optimizers, gradients, hyperparameters, ctx)
