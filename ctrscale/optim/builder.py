"""Wiring of the run's optimizers from config, for a DistributedModelParallel model.

Three parameter sets, one `CombinedOptimizer` (TorchRec's KeyedOptimizer, so one state dict
for checkpoints):
  * `embedding`: fused tables, updated inside FBGEMM's backward (`dmp.fused_optimizer`);
  * `embedding_replicated`: data-parallel tables (ordinary `.grad`s), updated by the torch
    optimizer that matches `optim.embedding` — so every table follows the configured
    embedding optimizer whatever its sharding;
  * `dense`: every other parameter, with `optim.dense`, its LR following the schedule.

`resolve_hyperparameters` turns the base-batch values of the config into the values of the
run's batch size by the scaling rule; `gradient_rule` says which L2/CowClip the embedding
gradients get (see `embedding_grad.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from ctrscale.config import Config, DenseOptimConfig, EmbeddingOptimConfig, OptimConfig
from ctrscale.distributed.sharding import data_parallel_table_names
from ctrscale.optim.cowclip import zeta_from_official_bound
from ctrscale.optim.dense import build_dense_optimizer
from ctrscale.optim.embedding_grad import GradientRule
from ctrscale.optim.scaling import ResolvedHyperparameters, resolve
from ctrscale.optim.schedule import lr_multiplier


def resolve_hyperparameters(config: Config, steps_per_epoch: int) -> ResolvedHyperparameters:
    optim = config.optim
    return resolve(
        optim.schedule.rule,
        base_batch_size=optim.schedule.base_batch_size,
        batch_size=config.data.batch_size,
        embedding_lr=optim.embedding.lr,
        embedding_l2=optim.embedding.l2,
        dense_lr=optim.dense.lr,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=optim.schedule.warmup_steps,
    )


def scaled(optim: OptimConfig, hp: ResolvedHyperparameters) -> OptimConfig:
    """`optim` with the learning rates and L2 of the run's batch size."""
    embedding = optim.embedding.model_copy(update={"lr": hp.embedding_lr, "l2": hp.embedding_l2})
    dense = optim.dense.model_copy(update={"lr": hp.dense_lr})
    cowclip_mode = optim.cowclip.mode
    if hp.cowclip and cowclip_mode == "off":
        cowclip_mode = "paper"
    cowclip = optim.cowclip.model_copy(update={"mode": cowclip_mode})
    return optim.model_copy(update={"embedding": embedding, "dense": dense, "cowclip": cowclip})


def gradient_rule(
    optim: OptimConfig, embedding_dims: set[int], first_order_tables: frozenset[str]
) -> GradientRule:
    cowclip = optim.cowclip
    zeta = {
        dim: cowclip.zeta
        if cowclip.zeta is not None
        else zeta_from_official_bound(cowclip.r, dim, cowclip.bound)
        for dim in embedding_dims
    }
    return GradientRule(
        l2=optim.embedding.l2,
        cowclip=cowclip.mode == "paper",
        r=cowclip.r,
        zeta_for_dim=zeta,
        unclipped_tables=first_order_tables,
    )


def module_path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("the embedding collection is not a submodule of the model")


def replicated_embedding_optimizer(
    config: EmbeddingOptimConfig,
) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    """The torch optimizer that computes what the fused FBGEMM one would, for `.grad` tables."""
    if config.name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=config.lr)
    if config.name == "adagrad":
        return lambda params: torch.optim.Adagrad(params, lr=config.lr, eps=config.eps)
    if config.name == "rowwise_adagrad":
        return lambda params: RowWiseAdagrad(params, lr=config.lr, eps=config.eps)
    raise ValueError(f"no replicated-table optimizer for {config.name} (Adam is RowAdam's)")


def dense_optimizer(
    config: DenseOptimConfig,
) -> Callable[[Iterable[tuple[str, nn.Parameter]]], torch.optim.Optimizer]:
    return lambda named: build_dense_optimizer(
        named,
        name=config.name,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        trust_clip=config.trust_clip,
        trust_coefficient=config.trust_coefficient,
    )


@dataclass
class RunOptimizers:
    combined: CombinedOptimizer
    dense: KeyedOptimizer
    dense_lr_multiplier: Callable[[int], float]
    _dense_base_lrs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._dense_base_lrs = [group["lr"] for group in self.dense.param_groups]

    def step(self, step: int) -> None:
        """Optimizer step number `step` (0-based): the dense LR follows the schedule, set from
        the step alone so that a resumed run needs no scheduler state."""
        factor = self.dense_lr_multiplier(step)
        for group, base in zip(self.dense.param_groups, self._dense_base_lrs, strict=True):
            group["lr"] = base * factor
        self.combined.step()

    def zero_grad(self) -> None:
        self.combined.zero_grad(set_to_none=True)

    def learning_rates(self) -> dict[str, float]:
        return {
            name: optimizer.param_groups[0]["lr"]
            for name, optimizer in self.combined.optimizers
            if optimizer.param_groups
        }


def build_optimizers(
    dmp: DistributedModelParallel,
    embedding_prefix: str,
    config: OptimConfig,
    warmup_steps: int,
    total_steps: int,
) -> RunOptimizers:
    """`config` holds the run's (scaled) values; `embedding_prefix` is the embedding
    collection's path in the model (e.g. `sparse_arch.embedding_bag_collection`)."""
    embedding_params, dense_params = {}, {}
    for name, param in dmp.named_parameters():
        if name.startswith(embedding_prefix + "."):
            embedding_params[name] = param
        else:
            dense_params[name] = param
    # Only the plan says which tables are replicated: every rank also lists the fused tables it
    # does not hold among its parameters, and those must not get an optimizer of their own.
    replicated_tables = set(data_parallel_table_names(dmp))
    replicated = {
        n: p for n, p in embedding_params.items() if n.rsplit(".", 2)[-2] in replicated_tables
    }

    parts: list[tuple[str, KeyedOptimizer]] = [("embedding", dmp.fused_optimizer)]
    # Replicated tables under Adam are RowAdam's (embedding_grad.py), like the sharded ones.
    if replicated and config.embedding.name != "adam":
        parts.append(
            (
                "embedding_replicated",
                KeyedOptimizerWrapper(replicated, replicated_embedding_optimizer(config.embedding)),
            )
        )
    build_dense = dense_optimizer(config.dense)
    names_of = {id(p): n for n, p in dense_params.items()}
    dense = KeyedOptimizerWrapper(
        dense_params, lambda params: build_dense([(names_of[id(p)], p) for p in params])
    )
    parts.append(("dense", dense))
    schedule = config.schedule
    return RunOptimizers(
        combined=CombinedOptimizer(parts),
        dense=dense,
        dense_lr_multiplier=functools.partial(
            lr_multiplier,
            warmup_steps=warmup_steps,
            total_steps=max(total_steps, warmup_steps + 1),
            decay=schedule.decay,
            step_milestones=tuple(schedule.step_milestones),
            step_gamma=schedule.step_gamma,
            min_ratio=schedule.min_ratio,
        ),
    )
