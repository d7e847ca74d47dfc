"""Where the rows of every table live in a DistributedModelParallel model.

TorchRec hides each table shard in an FBGEMM table-batched-embedding module (TBE) inside the
sharded EmbeddingBagCollection's lookups; several tables share one TBE, one flat weight
buffer and one pooled output. This module finds them and describes, per TBE, where each
(table, input feature) sits: its bag row in the TBE's offsets, its columns in the pooled
output, its rows in the flat buffer. Features of one TBE with the same local width, full
width and clipping are bundled into a `Group`, processed as one block by the gradient code.

It also lays per-row optimizer state out like the tables for checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import groupby
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

from ctrscale.choices import ShardingChoice
from ctrscale.errors import CtrscaleError


class _Feature(NamedTuple):
    """Where one (table, input feature) of a TBE sits; bundled into `Group`s."""

    kind: tuple[int, int, bool]  # (local width, full width, clipped): the grouping key
    position: int  # bag row in the TBE's offsets
    table: str
    input_feature: str  # the KJT key; a feature read by two tables has the same ids in both
    first_column: int  # in the pooled output
    key_offset: int  # makes (feature, id) keys distinct within the TBE
    flat_offset: int  # where the shard's row 0 starts in the flat weight buffer
    column_slot: int  # among the clipped tables whose rows are split over shards; else -1


@dataclass
class Group:
    """Features of one TBE with the same local width, full width and clipping: processed as
    one block. Per feature (tensors of length F_g): its bag row in the TBE's offsets, a key
    offset making (feature, id) keys distinct, its rows' offset in the flat weight buffer, and
    its slot among the column-sharded tables (-1: not sharded so); plus the group's output
    columns."""

    tables: list[str]
    input_features: tuple[str, ...]
    features: Tensor
    flat_columns: Tensor  # [F_g · width]: the group's block of the pooled output
    key_offsets: Tensor
    flat_offsets: Tensor  # where the shard's row 0 starts in the flat weight buffer
    column_slots: Tensor
    full_dim: int
    clipped: bool
    column_range: tuple[int, int] | None  # flat_columns as a slice, when they are one range
    column_sharded: bool  # some feature's table has its rows split over shards (and clips)


@dataclass
class TableShard:
    """One table's shard inside a TBE: its key (`table@row,col`) and its rows as a 2-D view
    of the TBE's weights."""

    key: str
    table: str
    weight: Tensor


@dataclass
class FusedTbe:
    """A TBE of table-, column- or row-wise shards, with its features bundled in groups."""

    module: nn.Module  # the FBGEMM TBE (`emb.emb_module`)
    num_features: int
    groups: list[Group]
    shards: list[TableShard]
    flat_weights: Tensor  # the TBE's weights as one flat buffer


@dataclass
class ReplicatedTables:
    """A data-parallel lookup's TBE: full replicas with ordinary (all-reduced) `.grad`s."""

    module: nn.Module  # the FBGEMM TBE (`emb.emb_module`)
    features: list[tuple[Any, str]]  # (table config, feature name) in bag order
    shards: list[TableShard]  # one per table, whose `.weight` is the table's parameter


def embedding_modules(model: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """Every TBE wrapper (`emb`, whose `emb.emb_module` is FBGEMM's) with its sharding type."""
    for sebc in model.modules():
        if not (hasattr(sebc, "_lookups") and hasattr(sebc, "_sharding_types")):
            continue
        for sharding_type, lookup in zip(sebc._sharding_types, sebc._lookups, strict=True):
            lookup = getattr(lookup, "module", lookup)  # data-parallel: DDP-wrapped
            for emb in lookup._emb_modules:
                yield emb, sharding_type


def shard_key(table) -> str:
    offsets = table.local_metadata.shard_offsets if table.local_metadata else (0, 0)
    return f"{table.name}@{offsets[0]},{offsets[1]}"


def split_clipped_tables(
    found: list[tuple[nn.Module, str]], clips: Callable[[str], bool]
) -> list[str]:
    """Clipped tables whose rows are split across column shards (those need their partial
    norms combined); a column-wise table no wider than the shard width is one shard."""
    return sorted(
        {
            table.name
            for emb, _ in found
            for table in emb.config.embedding_tables
            if clips(table.name) and table.local_cols < table.embedding_dim
        }
    )


def fused_tbe(emb: nn.Module, clips: Callable[[str], bool], column_tables: list[str]) -> FusedTbe:
    """The TBE's features and groups. The ids a TBE receives are local to its shards: TorchRec's
    row-wise input distribution subtracts each shard's first row (ids 7 and 9 of a table split
    in blocks of 5 arrive as 2 and 4), and other shards hold whole columns from row 0. So a
    feature's key offset is the number of rows of the shards before it in the TBE, and a key
    minus that offset is a row of the shard."""
    views = emb.emb_module.split_embedding_weights()
    per_feature, shards, column, key_offset = [], [], 0, 0
    for table, view in zip(emb.config.embedding_tables, views, strict=True):
        shards.append(TableShard(shard_key(table), table.name, view))
        for input_feature in table.feature_names:
            per_feature.append(
                _Feature(
                    kind=(table.local_cols, table.embedding_dim, clips(table.name)),
                    position=len(per_feature),
                    table=table.name,
                    input_feature=input_feature,
                    first_column=column,
                    key_offset=key_offset,
                    flat_offset=view.storage_offset(),
                    column_slot=column_tables.index(table.name)
                    if table.name in column_tables
                    else -1,
                )
            )
            column += table.local_cols
            key_offset += table.local_rows
    device = views[0].device
    return FusedTbe(
        emb.emb_module, len(per_feature), _groups(per_feature, device), shards, _flat(views)
    )


def replicated_tables(emb: nn.Module) -> ReplicatedTables:
    by_table = dict(emb.named_parameters_by_table())  # views whose .grad is the table's
    tables = emb.config.embedding_tables
    return ReplicatedTables(
        emb.emb_module,
        [(table, feature) for table in tables for feature in table.feature_names],
        [TableShard(shard_key(t), t.name, by_table[t.name]) for t in tables],
    )


def _flat(views: list[Tensor]) -> Tensor:
    """The one storage behind a TBE's per-table weight views, as a flat tensor."""
    storage = views[0].untyped_storage()
    if any(v.untyped_storage().data_ptr() != storage.data_ptr() for v in views):
        raise CtrscaleError("a TBE keeps its tables in several buffers; cannot update its rows")
    return torch.empty(0, dtype=views[0].dtype, device=views[0].device).set_(storage)


def _groups(per_feature: list[_Feature], device: torch.device) -> list[Group]:
    """Bundle features by (local width, full width, clipped) into `Group`s on `device`."""
    groups = []
    ordered = sorted(per_feature, key=lambda feature: feature.kind)
    for (width, full_dim, clipped), members in groupby(ordered, key=lambda f: f.kind):
        members = list(members)
        first_columns = [m.first_column for m in members]
        one_range = first_columns == list(range(first_columns[0], first_columns[-1] + 1, width))
        column_slots = [m.column_slot for m in members]

        def long(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        groups.append(
            Group(
                tables=[m.table for m in members],
                input_features=tuple(m.input_feature for m in members),
                features=long([m.position for m in members]),
                flat_columns=(
                    long(first_columns).unsqueeze(1) + long(list(range(width)))
                ).flatten(),
                key_offsets=long([m.key_offset for m in members]),
                flat_offsets=long([m.flat_offset for m in members]),
                column_slots=long(column_slots),
                full_dim=full_dim,
                clipped=clipped,
                column_range=(first_columns[0], first_columns[-1] + width) if one_range else None,
                column_sharded=any(slot >= 0 for slot in column_slots),
            )
        )
    return groups


def is_replicated(sharding_type: str) -> bool:
    return sharding_type == ShardingChoice.DATA_PARALLEL


def sharded_like_weights(
    model_state: dict[str, Any], states: dict[str, dict[str, Tensor]]
) -> dict[str, Any]:
    """Per-row optimizer state laid out like the tables it belongs to, for DCP: a
    ShardedTensor with the weight's shard metadata for a sharded table (so a checkpoint
    re-shards), a plain tensor for a replicated one. `states` maps `table@row,col` shard keys
    to {state name: tensor shaped like that shard}; the result maps `table.name` to tensors."""
    by_table: dict[str, dict[tuple[int, int], dict[str, Tensor]]] = {}
    for key, state in states.items():
        table, offsets = key.split("@")
        row, col = (int(x) for x in offsets.split(","))
        by_table.setdefault(table, {})[(row, col)] = state
    result: dict[str, Any] = {}
    for name, weight in model_state.items():
        table = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if table not in by_table:
            continue
        names = next(iter(by_table[table].values())).keys()
        for state_name in names:
            if isinstance(weight, ShardedTensor):
                shards = [
                    Shard(by_table[table][tuple(s.metadata.shard_offsets)][state_name], s.metadata)
                    for s in weight.local_shards()
                ]
                result[f"{table}.{state_name}"] = (
                    ShardedTensor._init_from_local_shards_and_global_metadata(
                        shards, weight.metadata(), process_group=weight._process_group
                    )
                )
            else:
                result[f"{table}.{state_name}"] = by_table[table][(0, 0)][state_name]
    return result
