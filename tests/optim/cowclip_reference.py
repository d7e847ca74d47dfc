"""CowClip + L2 on sharded tables versus the paper's formula applied to a dense gradient.

Run in-process (world size 1) by tests/optim/test_cowclip_sharded.py, or as a script under
torchrun for several processes:

    python -m torch.distributed.run --nproc_per_node 2 tests/optim/cowclip_reference.py \
        SHARDING EMBEDDING_OPTIMIZER SEMANTICS OUT.json

Both sides start from the same weights and see the same global batches. The sharded side is
ctrscale's trainer (its embedding update: fused FBGEMM SGD, or Adam's row form, gradients
rewritten per id). The reference is an unsharded copy whose table gradients come from
autograd as dense tensors, and whose L2, clipping and optimizer are written out literally, one
row at a time, from Algorithm 1 — for lazy semantics on the rows the batch looks up, for
dense semantics (the official code's Keras optimizer) on every row of every table.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from ctrscale.config import load_config
from ctrscale.data.schema import DENSE_FEATURES, SPARSE_FEATURES
from ctrscale.distributed.context import init_distributed
from ctrscale.models import build_model
from ctrscale.train.step import build_trainer

GLOBAL_BATCH = 256
STEPS = 3
TABLE_ROWS = 24  # 256 samples over 24 ids: every id repeats, some dozens of times
# Dense semantics: tables of 40 rows of which ids 24..39 are never looked up, so that the
# update of absent rows (L2 pull, Adam's moments) is part of the comparison.
DENSE_TABLE_ROWS = 40
MISSING = -1  # a sample without a value for a feature: an empty bag, no lookup
EMBEDDING_LR, DENSE_LR, L2, R = 0.5, 0.1, 0.05, 0.005
# ε above Adam's 1e-8 so that float32 summation-order noise in a near-zero gradient is not
# amplified into a visible step difference (Adam divides by √v).
ADAM_LR, BETA1, BETA2, EPS = 0.01, 0.9, 0.999, 1e-6


def config_for(sharding: str, embedding_optimizer: str, semantics: str = "lazy"):
    lr = EMBEDDING_LR if embedding_optimizer == "sgd" else ADAM_LR
    return load_config(
        None,
        [
            f'distributed.sharding_type="{sharding}"',
            "distributed.column_shard_dim=4",  # 8-wide tables split into 2 shards
            'distributed.device="cpu"',
            f"data.batch_size={GLOBAL_BATCH}",
            "model.embedding_dim=8",
            "model.dnn=[16]",
            f'optim.embedding.name="{embedding_optimizer}"',
            f"optim.embedding.lr={lr}",
            f"optim.embedding.eps={EPS}",
            f"optim.embedding.l2={L2}",
            f'optim.embedding.semantics="{semantics}"',
            'optim.dense.name="sgd"',
            "optim.dense.momentum=0.0",
            f"optim.dense.lr={DENSE_LR}",
            'optim.schedule.rule="none"',
            'optim.cowclip.mode="paper"',
            f"optim.cowclip.r={R}",
            "optim.cowclip.zeta=0.0",
        ],
    )


def global_batches(seed: int = 7) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        # Skewed ids: low ids are frequent, high ids rare, as in CTR data.
        shape = (len(SPARSE_FEATURES), GLOBAL_BATCH)
        ids = ((torch.rand(shape, generator=generator) ** 3) * TABLE_ROWS).long()
        ids[torch.rand(shape, generator=generator) < 0.1] = MISSING
        dense = torch.rand(GLOBAL_BATCH, len(DENSE_FEATURES), generator=generator)
        labels = (torch.rand(GLOBAL_BATCH, generator=generator) < 0.3).float()
        batches.append(Batch(dense, as_features(ids), labels))
    return batches


def as_features(ids: torch.Tensor) -> KeyedJaggedTensor:
    """[features, samples] ids, MISSING where a sample has no value, as single-valued bags."""
    present = ids != MISSING
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(SPARSE_FEATURES),
        values=ids[present],
        lengths=present.flatten().to(torch.int32),
    )


def id_matrix(features: KeyedJaggedTensor) -> torch.Tensor:
    ids = torch.full((features.lengths().numel(),), MISSING)
    ids[features.lengths().bool()] = features.values()
    return ids.view(len(SPARSE_FEATURES), -1)


def rank_slice(batch: Batch, rank: int, world_size: int) -> Batch:
    size = GLOBAL_BATCH // world_size
    rows = slice(rank * size, (rank + 1) * size)
    features = as_features(id_matrix(batch.sparse_features)[:, rows])
    return Batch(batch.dense_features[rows], features, batch.labels[rows])


def full_state(dmp) -> dict[str, torch.Tensor]:
    """Every parameter as one full tensor (sharded tables gathered to every rank)."""
    state = {}
    for name, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.zeros(value.size()) if dist.get_rank() == 0 else None
            value.gather(dst=0, out=full)
            full = full if full is not None else torch.zeros(value.size())
            dist.broadcast(full, src=0)
            state[name] = full
        else:
            state[name] = value.detach().clone()
    return state


class LiteralAdam:
    """Adam one row at a time (Kingma & Ba, Algorithm 1), with the run's step count."""

    def __init__(self) -> None:
        self.moments: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.t = 0

    def row_step(self, table: str, row: int, weight: torch.Tensor, g: torch.Tensor) -> None:
        m, v = self.moments.get((table, row), (torch.zeros_like(g), torch.zeros_like(g)))
        m, v = BETA1 * m + (1 - BETA1) * g, BETA2 * v + (1 - BETA2) * g * g
        self.moments[(table, row)] = (m, v)
        m_hat, v_hat = m / (1 - BETA1**self.t), v / (1 - BETA2**self.t)
        weight[row] -= ADAM_LR * m_hat / (v_hat.sqrt() + EPS)


def reference_step(
    model, batch: Batch, first_order: frozenset[str], adam: LiteralAdam | None, dense: bool
) -> tuple[int, int]:
    """One step with L2 and CowClip computed literally from Algorithm 1, then SGD or Adam on
    the embedding rows — the looked-up ones (lazy) or all (dense: absent rows get 2λw,
    never clipped) — and SGD on the dense layers."""
    model.zero_grad()
    logits = model(batch.dense_features, batch.sparse_features)
    F.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    ids = id_matrix(batch.sparse_features)
    clipped = unclipped = 0
    if adam is not None:
        adam.t += 1
    with torch.no_grad():
        tables = model.embedding_bag_collection.embedding_bags
        for name, bag in tables.items():
            feature = name.removesuffix("_wide")
            weight, grad = bag.weight, bag.weight.grad.clone()
            feature_ids = [i for i in ids[SPARSE_FEATURES.index(feature)].tolist() if i != MISSING]
            updated = range(weight.shape[0]) if dense else sorted(set(feature_ids))
            for row in updated:
                count = feature_ids.count(row)
                g = grad[row] + 2 * L2 * weight[row]
                if name not in first_order and count > 0:
                    threshold = count * max(R * weight[row].norm().item(), 0.0)
                    norm = g.norm().item()
                    if norm > threshold:
                        g = g * (threshold / norm)
                        clipped += 1
                    else:
                        unclipped += 1
                grad[row] = g
            if adam is None:
                for row in updated:
                    weight[row] -= EMBEDDING_LR * grad[row]
            else:
                for row in updated:
                    adam.row_step(name, row, weight, grad[row])
        embedding_params = {id(b.weight) for b in tables.values()}
        for param in model.parameters():
            if id(param) not in embedding_params:
                param -= DENSE_LR * param.grad
    return clipped, unclipped


def run(sharding: str, embedding_optimizer: str = "sgd", semantics: str = "lazy") -> dict:
    config = config_for(sharding, embedding_optimizer, semantics)
    ctx = init_distributed(config.distributed)
    torch.manual_seed(0)
    sizes = dict.fromkeys(SPARSE_FEATURES, DENSE_TABLE_ROWS if semantics == "dense" else TABLE_ROWS)
    trainer = build_trainer(config, ctx, sizes, steps_per_epoch=STEPS, total_steps=STEPS)
    reference = build_model(config.model, sizes, embedding_device=torch.device("cpu"))
    reference.load_state_dict(full_state(trainer.dmp))
    first_order = reference.first_order_tables

    adam = LiteralAdam() if embedding_optimizer == "adam" else None
    clipped = unclipped = 0
    for step, batch in enumerate(global_batches()):
        trainer.step(rank_slice(batch, ctx.rank, ctx.world_size), GLOBAL_BATCH, step)
        more_clipped, more_unclipped = reference_step(
            reference, batch, first_order, adam, dense=semantics == "dense"
        )
        clipped, unclipped = clipped + more_clipped, unclipped + more_unclipped

    counted = [float(count) for count in trainer.clip_counts()]
    if dist.get_world_size() > 1:
        counted = torch.tensor(counted)
        dist.all_reduce(counted)
        counted = counted.tolist()
    sharded, expected = full_state(trainer.dmp), reference.state_dict()
    worst = max(
        ((sharded[name] - value).abs().max() / value.abs().max().clamp_min(1e-12)).item()
        for name, value in expected.items()
    )
    return {
        "max_relative_error": worst,
        "clipped_ids": clipped,
        "unclipped_ids": unclipped,
        "counted_clipped": counted[0],
        "counted_seen": counted[1],
    }


if __name__ == "__main__":
    sharding, embedding_optimizer, semantics, out = sys.argv[1:5]
    result = run(sharding, embedding_optimizer, semantics)
    if dist.get_rank() == 0:
        with open(out, "w") as handle:
            json.dump(result, handle)
