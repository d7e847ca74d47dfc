"""Wiring of the run's optimizers from config, for a DistributedModelParallel model.

Three parameter sets, one `CombinedOptimizer` (TorchRec's KeyedOptimizer, so one state dict
for checkpoints):
  * `embedding`: fused tables, updated inside FBGEMM's backward (`dmp.fused_optimizer`);
  * `embedding_replicated`: data-parallel tables (ordinary `.grad`s), updated by the torch
    optimizer that matches `optim.embedding` — so every table follows the configured
    embedding optimizer whatever its sharding;
  * `dense`: every other parameter, with `optim.dense`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from ctrscale.config import DenseOptimConfig, EmbeddingOptimConfig, OptimConfig
from ctrscale.optim.dense import build_dense_optimizer


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
    return lambda params: torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps)


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
    )


@dataclass
class RunOptimizers:
    combined: CombinedOptimizer

    def step(self) -> None:
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
    dmp: DistributedModelParallel, embedding_prefix: str, config: OptimConfig
) -> RunOptimizers:
    """`embedding_prefix`: the embedding collection's path in the model (e.g. `sparse_arch`)."""
    embedding_params, dense_params = {}, {}
    for name, param in dmp.named_parameters():
        if name.startswith(embedding_prefix + "."):
            embedding_params[name] = param
        else:
            dense_params[name] = param
    # Fused tables are exposed as parameters too, but never get a `.grad`.
    fused = set(dmp.fused_optimizer.params)
    replicated = {n: p for n, p in embedding_params.items() if n not in fused}

    parts: list[tuple[str, KeyedOptimizer]] = [("embedding", dmp.fused_optimizer)]
    if replicated:
        parts.append(
            (
                "embedding_replicated",
                KeyedOptimizerWrapper(replicated, replicated_embedding_optimizer(config.embedding)),
            )
        )
    build_dense = dense_optimizer(config.dense)
    names_of = {id(p): n for n, p in dense_params.items()}
    parts.append(
        (
            "dense",
            KeyedOptimizerWrapper(
                dense_params, lambda params: build_dense([(names_of[id(p)], p) for p in params])
            ),
        )
    )
    return RunOptimizers(combined=CombinedOptimizer(parts))
