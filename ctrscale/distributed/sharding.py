"""Sharding plans and the DistributedModelParallel wrapper.

Every embedding table is either *sharded* (table-/column-/row-wise shards in FBGEMM TBEs,
updated inside FBGEMM's backward or right after it, so no table-sized gradient ever exists) or
*data-parallel* (a replicated table with an ordinary all-reduced `.grad`); the embedding update
(`ctrscale/optim/embedding/`) applies the same optimizer settings to both. `auto` lets
TorchRec's planner pick among the sharded types; data-parallel is used only when asked for,
because the planner would otherwise replicate every small table onto a dense kernel.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from ctrscale.choices import ShardingChoice
from ctrscale.distributed.context import DistContext
from ctrscale.errors import CtrscaleError

# Pooled-table sharding types TorchRec can run per backend. Row-wise needs reduce-scatter,
# which gloo lacks (on CPU, and on GPUs driven by gloo alike); TorchRec refuses it on CPU
# ("No available sharding type and compute kernel combination").
SHARDING_TYPES: dict[str, tuple[ShardingChoice, ...]] = {
    "gloo": (
        ShardingChoice.TABLE_WISE,
        ShardingChoice.COLUMN_WISE,
        ShardingChoice.TABLE_COLUMN_WISE,
        ShardingChoice.DATA_PARALLEL,
    ),
    "nccl": tuple(choice for choice in ShardingChoice if choice != ShardingChoice.AUTO),
}


def allowed_sharding_types(backend: str) -> tuple[ShardingChoice, ...]:
    return SHARDING_TYPES[backend]


def check_sharding_type(requested: ShardingChoice, backend: str) -> None:
    if requested != ShardingChoice.AUTO and requested not in allowed_sharding_types(backend):
        possible = ", ".join(choice.value for choice in allowed_sharding_types(backend))
        raise CtrscaleError(
            f"distributed.sharding_type={requested} is not available with the {backend} "
            f"backend; possible: auto, {possible}"
            + (" (row-wise needs reduce-scatter, which gloo lacks)" if backend == "gloo" else "")
        )


def _table_constraints(
    ebc: EmbeddingBagCollection,
    sharding_type: ShardingChoice,
    backend: str,
    column_shard_dim: int | None,
) -> dict[str, ParameterConstraints]:
    if sharding_type == ShardingChoice.DATA_PARALLEL:
        kinds, kernels = [ShardingType.DATA_PARALLEL.value], [EmbeddingComputeKernel.DENSE.value]
    else:
        fused_types = [
            t.value for t in allowed_sharding_types(backend) if t != ShardingChoice.DATA_PARALLEL
        ]
        kinds = fused_types if sharding_type == ShardingChoice.AUTO else [sharding_type.value]
        kernels = [EmbeddingComputeKernel.FUSED.value]
    return {
        table.name: ParameterConstraints(
            sharding_types=list(kinds), compute_kernels=kernels, min_partition=column_shard_dim
        )
        for table in ebc.embedding_bag_configs()
    }


def shard_model(
    model: nn.Module,
    ebc: EmbeddingBagCollection,
    ctx: DistContext,
    *,
    sharding_type: ShardingChoice,
    fused_params: dict[str, Any],
    local_batch_size: int,
    column_shard_dim: int | None = None,
) -> DistributedModelParallel:
    """Plan and shard `model`'s embedding tables; dense layers become data-parallel (DDP).

    `fused_params`: the FBGEMM arguments of fused tables (`EmbeddingUpdate.fused_params`)."""
    sharding_type = ShardingChoice(sharding_type)
    check_sharding_type(sharding_type, ctx.backend)
    if sharding_type == ShardingChoice.DATA_PARALLEL:
        fused_params = None  # no fused table
    sharders = [EmbeddingBagCollectionSharder(fused_params=fused_params)]
    planner = EmbeddingShardingPlanner(
        topology=topology(ctx),
        batch_size=local_batch_size,
        constraints=_table_constraints(ebc, sharding_type, ctx.backend, column_shard_dim),
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=ctx.device, plan=plan, sharders=sharders)


def topology(ctx: DistContext) -> Topology:
    """The planner's view of the devices. On GPUs with the memory the device really has
    (TorchRec assumes 32 GiB otherwise, and would overfill a smaller GPU or waste a larger)."""
    hbm_cap = None
    if ctx.device.type == "cuda":
        hbm_cap = torch.cuda.get_device_properties(ctx.device).total_memory
    return Topology(
        world_size=ctx.world_size,
        compute_device=ctx.device.type,
        local_world_size=ctx.local_world_size,
        hbm_cap=hbm_cap,
    )


# Rows initialised per seeded block: bounds the temporary memory of initialising a big table.
INIT_BLOCK_ROWS = 65_536


def _block_seed(seed: int, table: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{table}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def initialize_tables(
    dmp: DistributedModelParallel, tables: list[EmbeddingBagConfig], prefix: str, seed: int
) -> None:
    """Give every table the same initial values whatever its sharding and the world size.

    TorchRec initialises each shard from the global RNG in plan order, so the same seed gives
    different tables under table-wise, column-wise or data-parallel plans and different world
    sizes. Here row block b of table t is drawn from its own generator, seeded by (seed, t, b),
    with the table's own `init_fn`, and each rank copies the rows and columns of its shards.
    """
    state = dmp.state_dict()
    for table in tables:
        weight = state[f"{prefix}.embedding_bags.{table.name}.weight"]
        if isinstance(weight, ShardedTensor):
            shards = [(s.metadata.shard_offsets, s.tensor) for s in weight.local_shards()]
        else:  # data-parallel: a full replica on every rank
            shards = [([0, 0], weight)]
        for (row0, col0), local in shards:
            _fill_shard(table, seed, row0, col0, local)


def _fill_shard(
    table: EmbeddingBagConfig, seed: int, row0: int, col0: int, local: torch.Tensor
) -> None:
    rows, cols = local.shape
    first_block, last_block = row0 // INIT_BLOCK_ROWS, (row0 + rows - 1) // INIT_BLOCK_ROWS
    for block in range(first_block, last_block + 1):
        start = block * INIT_BLOCK_ROWS
        stop = min(start + INIT_BLOCK_ROWS, table.num_embeddings)
        values = torch.empty(stop - start, table.embedding_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_block_seed(seed, table.name, block))
            table.init_fn(values)
        lo, hi = max(row0, start), min(row0 + rows, stop)
        local[lo - row0 : hi - row0].copy_(values[lo - start : hi - start, col0 : col0 + cols])
