"""Sharding plans and the DistributedModelParallel wrapper.

Every embedding table is either *fused* (table-/column-/row-wise shards whose optimizer runs
inside FBGEMM's backward, so no table-sized gradient ever exists) or *data-parallel* (a
replicated table with an ordinary all-reduced `.grad`, which the trainer then updates with the
same embedding-optimizer settings). `auto` lets TorchRec's planner pick among the fused types;
data-parallel is used only when asked for, because the planner would otherwise replicate every
small table and silently route it to a different optimizer path.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import CowClipDefinition, WeightDecayMode
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from ctrscale.config import OptimConfig
from ctrscale.distributed.context import DistContext
from ctrscale.errors import CtrscaleError

# Pooled-table sharding types TorchRec can run per device. Row-wise needs reduce-scatter,
# which gloo lacks, so TorchRec refuses it on CPU ("No available sharding type and compute
# kernel combination").
SHARDING_TYPES = {
    "cpu": ("table_wise", "column_wise", "table_column_wise", "data_parallel"),
    "cuda": (
        "table_wise",
        "column_wise",
        "table_column_wise",
        "row_wise",
        "table_row_wise",
        "data_parallel",
    ),
}

# FBGEMM optimizers fused into the TBE backward, per device (CPU kernels exist only for these;
# ADAM and the others raise "not supported in CPU mode").
FUSED_OPTIMIZERS = {
    "cpu": {
        "sgd": EmbOptimType.EXACT_SGD,
        "adagrad": EmbOptimType.EXACT_ADAGRAD,
        "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    },
    "cuda": {
        "sgd": EmbOptimType.EXACT_SGD,
        "adagrad": EmbOptimType.EXACT_ADAGRAD,
        "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        "adam": EmbOptimType.ADAM,
    },
}


def has_fused_adam(device: torch.device) -> bool:
    return "adam" in FUSED_OPTIMIZERS[device.type]


def sharded_like_weights(
    model_state: dict[str, Any], moments: dict[str, tuple[Tensor, Tensor]]
) -> dict[str, Any]:
    """RowAdam's moments laid out like the tables they belong to, for DCP: a ShardedTensor
    with the weight's shard metadata for a sharded table (so a checkpoint re-shards), a plain
    tensor for a replicated one. `moments` is keyed by `table@row_offset,col_offset`."""
    by_table: dict[str, dict[tuple[int, int], tuple[Tensor, Tensor]]] = {}
    for key, pair in moments.items():
        table, offsets = key.split("@")
        row, col = (int(x) for x in offsets.split(","))
        by_table.setdefault(table, {})[(row, col)] = pair
    state: dict[str, Any] = {}
    for name, weight in model_state.items():
        table = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if table not in by_table:
            continue
        for slot, moment in enumerate(("exp_avg", "exp_avg_sq")):
            if isinstance(weight, ShardedTensor):
                shards = [
                    Shard(by_table[table][tuple(s.metadata.shard_offsets)][slot], s.metadata)
                    for s in weight.local_shards()
                ]
                state[f"{table}.{moment}"] = (
                    ShardedTensor._init_from_local_shards_and_global_metadata(
                        shards, weight.metadata(), process_group=weight._process_group
                    )
                )
            else:
                state[f"{table}.{moment}"] = by_table[table][(0, 0)][slot]
    return state


def allowed_sharding_types(device: torch.device) -> tuple[str, ...]:
    return SHARDING_TYPES[device.type]


def check_sharding_type(requested: str, device: torch.device) -> None:
    if requested != "auto" and requested not in allowed_sharding_types(device):
        raise CtrscaleError(
            f"distributed.sharding_type={requested} is not available on {device.type}; "
            f"possible: auto, {', '.join(allowed_sharding_types(device))}"
            + (" (row-wise needs reduce-scatter, which gloo lacks)" if device.type == "cpu" else "")
        )


def fused_optimizer_params(optim: OptimConfig, device: torch.device) -> dict[str, Any]:
    """FBGEMM TBE arguments that make the embedding optimizer run inside the backward.

    L2 is not passed to FBGEMM: ctrscale adds it to the gradient itself (embedding_grad.py), so
    that it is the same on every device and for every optimizer, and precedes CowClip.
    """
    config = optim.embedding
    available = FUSED_OPTIMIZERS[device.type]
    if config.name == "adam" and config.name not in available:
        # ctrscale's RowAdam applies Adam after the backward (row_adam.py); FBGEMM's kernel
        # still runs the backward, as a zero-LR SGD that leaves the weights alone.
        return {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.0}
    if config.name not in available:
        raise CtrscaleError(
            f"optim.embedding.name={config.name} has no fused FBGEMM kernel on {device.type}; "
            f"fused there: {', '.join(available)}"
        )
    params: dict[str, Any] = {"optimizer": available[config.name], "learning_rate": config.lr}
    if config.name in ("adagrad", "rowwise_adagrad", "adam"):
        params["eps"] = config.eps
    if config.name == "adam":
        params["beta1"], params["beta2"] = config.betas
    if optim.cowclip.mode == "fbgemm_rowwise":
        params.update(_fbgemm_cowclip(optim))
    return params


def _fbgemm_cowclip(optim: OptimConfig) -> dict[str, Any]:
    """FBGEMM's own CowClip variant: a running per-row counter instead of the batch count, and
    it clips the row-wise Adagrad step, not the gradient. Not the paper's Algorithm 1."""
    if optim.embedding.name != "rowwise_adagrad":
        raise CtrscaleError(
            "optim.cowclip.mode=fbgemm_rowwise needs optim.embedding.name=rowwise_adagrad "
            f"(FBGEMM implements it only there; got {optim.embedding.name})"
        )
    if optim.cowclip.zeta is None:
        raise CtrscaleError(
            "optim.cowclip.mode=fbgemm_rowwise takes its lower bound from optim.cowclip.zeta; "
            "set it (the official-code `bound` convention applies to mode=paper only)"
        )
    return {
        "weight_decay_mode": WeightDecayMode.COWCLIP,
        "cowclip_regularization": CowClipDefinition(
            counter_halflife=-1,
            weight_norm_coefficient=optim.cowclip.r,
            lower_bound=optim.cowclip.zeta,
        ),
    }


def _table_constraints(
    ebc: EmbeddingBagCollection,
    sharding_type: str,
    device: torch.device,
    column_shard_dim: int | None,
) -> dict[str, ParameterConstraints]:
    if sharding_type == "data_parallel":
        kinds, kernels = ["data_parallel"], [EmbeddingComputeKernel.DENSE.value]
    else:
        fused_types = [t for t in allowed_sharding_types(device) if t != "data_parallel"]
        kinds = fused_types if sharding_type == "auto" else [sharding_type]
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
    sharding_type: str,
    optim: OptimConfig,
    local_batch_size: int,
    column_shard_dim: int | None = None,
) -> DistributedModelParallel:
    """Plan and shard `model`'s embedding tables; dense layers become data-parallel (DDP)."""
    check_sharding_type(sharding_type, ctx.device)
    fused_params = (
        None if sharding_type == "data_parallel" else fused_optimizer_params(optim, ctx.device)
    )
    sharders = [EmbeddingBagCollectionSharder(fused_params=fused_params)]
    planner = EmbeddingShardingPlanner(
        topology=Topology(
            world_size=ctx.world_size,
            compute_device=ctx.device.type,
            local_world_size=ctx.local_world_size,
        ),
        batch_size=local_batch_size,
        constraints=_table_constraints(ebc, sharding_type, ctx.device, column_shard_dim),
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=ctx.device, plan=plan, sharders=sharders)


def data_parallel_table_names(dmp: DistributedModelParallel) -> list[str]:
    """Tables replicated with a dense kernel (ordinary `.grad`s, not fused)."""
    return [
        name
        for module_plan in dmp.plan.plan.values()
        for name, option in module_plan.items()
        if option.sharding_type == ShardingType.DATA_PARALLEL.value
    ]


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
