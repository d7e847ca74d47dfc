"""Exact per-id rewriting of embedding gradients on TorchRec-sharded tables: L2 and CowClip.

Where it acts: a forward hook on every FBGEMM table-batched-embedding module (TBE) inside the
sharded EmbeddingBagCollection records the ids the TBE looked up and hooks the TBE's pooled
output, whose gradient is rewritten before FBGEMM's backward — and the optimizer fused into
it — consume it. For table-, column- and row-wise shards the TBE runs on the rank that owns the
shard, after TorchRec's input all-to-all, over the *global* batch: ids, counts and per-id sums
are global, so N processes compute exactly what one process computes.

Why this is exact: for a single-valued feature the output row of sample s is w[id_s] and the
gradient reaching it is s's contribution to the id's gradient row. Adding 2λ·w/cnt to each of
an id's cnt rows adds the L2 gradient 2λw once per id; scaling each row by its id's CowClip
factor scales the id's summed row by that factor. Multi-valued (pooled) bags would need a factor
per id inside one pooled row, so they are refused, never approximated.

Column-wise shards hold slices of a row: each shard's partial squared norms of Σg and w are
summed over the shards of the table with one all-reduce per step on a dedicated process group
(ranks holding no column-wise shard join it after their backward), and every shard then
applies the same factor. Data-parallel tables (replicated, dense kernel) see only the local
batch in their backward, so they are rewritten after the backward instead, on the all-reduced
`.grad`, with counts all-reduced over ranks.

Optionally the same hooks also *apply* the embedding optimizer, where FBGEMM cannot fuse it
(Adam on CPU; Adam on data-parallel tables): the rewritten per-id gradient rows are handed to
`RowAdam` after the backward, and FBGEMM's fused optimizer is a zero-LR SGD (see sharding.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ctrscale.errors import CtrscaleError
from ctrscale.optim.cowclip import IdSegments, cowclip_scale, segment_ids, segment_sq_norms
from ctrscale.optim.row_adam import RowAdam


@dataclass(frozen=True)
class GradientRule:
    """What to do to every table's gradient: L2 coefficient λ and CowClip (r, ζ per dim)."""

    l2: float
    cowclip: bool
    r: float
    zeta_for_dim: dict[int, float]  # ζ by full embedding dim (official convention depends on d)
    unclipped_tables: frozenset[str]  # first-order (wide) tables: the paper does not clip them

    def clips(self, table: str) -> bool:
        return self.cowclip and table not in self.unclipped_tables

    @property
    def active(self) -> bool:
        return self.cowclip or self.l2 > 0


@dataclass
class _Feature:
    """One feature's slice of a TBE's pooled output."""

    index: int  # position among the TBE's features (bag b of feature f is f*B + b)
    table: str
    col_start: int
    col_end: int
    full_dim: int
    column_sharded: bool
    shard: str  # "table@row_offset,col_offset": the local shard this feature reads


@dataclass
class _Tbe:
    features: list[_Feature]
    weights: dict[str, Tensor]  # shard key → the shard's weight rows (views into the TBE)
    row_adam: bool  # RowAdam updates this TBE's rows (FBGEMM cannot fuse Adam for it)


@dataclass
class _PendingColumnNorms:
    """Per-sample partial squared norms of column-sharded tables, reduced once per step."""

    buffer: Tensor | None = None
    filled: bool = False


def _lookups_with_types(sharded_ebc: nn.Module):
    for sharding_type, lookup in zip(
        sharded_ebc._sharding_types, sharded_ebc._lookups, strict=True
    ):
        yield sharding_type, getattr(lookup, "module", lookup)  # data-parallel: DDP-wrapped


def _sharded_ebcs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_lookups") and hasattr(m, "_sharding_types")]


@dataclass
class EmbeddingGradientTransform:
    """Installs the hooks on a DistributedModelParallel model and keeps their per-step state."""

    rule: GradientRule
    row_adam: RowAdam | None = None
    column_tables: list[str] = field(default_factory=list)  # same order on every rank
    group: dist.ProcessGroup | None = None
    _pending: _PendingColumnNorms = field(default_factory=_PendingColumnNorms)
    _replicated: list[tuple[_Tbe, nn.Module]] = field(default_factory=list)
    _replicated_ids: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    _row_updates: list[tuple[str, Tensor, Tensor, Tensor]] = field(default_factory=list)

    @classmethod
    def install(
        cls,
        dmp: nn.Module,
        rule: GradientRule,
        row_adam: RowAdam | None = None,
        fused_adam: bool = True,
    ) -> EmbeddingGradientTransform | None:
        """`row_adam`: the embedding optimizer is Adam; it then updates the data-parallel
        tables, and the sharded ones too unless FBGEMM fuses Adam on this device
        (`fused_adam`)."""
        if not rule.active and row_adam is None:
            return None
        transform = cls(rule, row_adam)
        tbes = []
        for sebc in _sharded_ebcs(dmp):
            for sharding_type, lookup in _lookups_with_types(sebc):
                for emb in lookup._emb_modules:
                    replicated = sharding_type == "data_parallel"
                    uses_row_adam = row_adam is not None and (replicated or not fused_adam)
                    tbe = transform._describe(emb, sharding_type, uses_row_adam)
                    tbes.append((tbe, emb, sharding_type))
                    if uses_row_adam:
                        for key, weight in tbe.weights.items():
                            row_adam.add_shard(key, weight)
        transform.column_tables = sorted(
            {f.table for tbe, _, _ in tbes for f in tbe.features if f.column_sharded}
        )
        transform.column_tables = _agree_across_ranks(transform.column_tables)
        if transform.column_tables and dist.is_initialized() and dist.get_world_size() > 1:
            # A group of its own: its one all-reduce per step must not interleave with DDP's
            # and TorchRec's collectives on the default group.
            transform.group = dist.new_group(backend=dist.get_backend())
        for tbe, emb, sharding_type in tbes:
            if sharding_type == "data_parallel":
                transform._replicated.append((tbe, emb))
                emb.emb_module.register_forward_hook(
                    transform._record_replicated_ids, with_kwargs=True
                )
            else:
                emb.emb_module.register_forward_hook(
                    lambda module, args, kwargs, out, tbe=tbe: transform._hook_output(
                        tbe, kwargs, out
                    ),
                    with_kwargs=True,
                )
        return transform

    def _describe(self, emb: nn.Module, sharding_type: str, row_adam: bool) -> _Tbe:
        features, weights, column = [], {}, 0
        column_sharded = sharding_type in ("column_wise", "table_column_wise")
        if sharding_type == "data_parallel":  # views whose .grad is the table's gradient
            by_table = dict(emb.named_parameters_by_table())
            local_weights = [by_table[t.name] for t in emb.config.embedding_tables]
        else:
            local_weights = emb.emb_module.split_embedding_weights()
        for table, weight in zip(emb.config.embedding_tables, local_weights, strict=True):
            offsets = table.local_metadata.shard_offsets if table.local_metadata else (0, 0)
            shard = f"{table.name}@{offsets[0]},{offsets[1]}"
            weights[shard] = weight
            for _ in table.feature_names:
                features.append(
                    _Feature(
                        index=len(features),
                        table=table.name,
                        col_start=column,
                        col_end=column + table.local_cols,
                        full_dim=table.embedding_dim,
                        column_sharded=column_sharded,
                        shard=shard,
                    )
                )
                column += table.local_cols
        return _Tbe(features, weights, row_adam)

    # ---- fused shards: rewrite the pooled output's gradient before FBGEMM's backward ----

    def _hook_output(self, tbe: _Tbe, kwargs: dict, output: Tensor) -> None:
        if not output.requires_grad:
            return
        indices, offsets = kwargs["indices"], kwargs["offsets"]
        batch = (offsets.numel() - 1) // len(tbe.features)
        rows = output.detach()
        output.register_hook(
            lambda grad: self._rewrite(tbe, indices, offsets, batch, rows, grad.clone())
        )

    def _rewrite(
        self, tbe: _Tbe, indices: Tensor, offsets: Tensor, batch: int, rows: Tensor, grad: Tensor
    ) -> Tensor:
        lengths = offsets.diff()
        column_parts = []
        for feature in tbe.features:
            bags = slice(feature.index * batch, (feature.index + 1) * batch)
            bag_lengths = lengths[bags]
            if bool((bag_lengths > 1).any()):
                raise CtrscaleError(
                    f"table {feature.table}: a sample looks up several ids; L2 and CowClip are "
                    "exact only for single-valued features, so multi-valued ones are refused"
                )
            samples = bag_lengths.nonzero().squeeze(1)
            ids = indices[offsets[bags][samples]]
            cols = slice(feature.col_start, feature.col_end)
            g, w = grad[samples, cols], rows[samples, cols]
            segments = segment_ids(ids)
            if self.rule.l2 > 0:
                share = (2.0 * self.rule.l2) / segments.counts[segments.inverse].to(g.dtype)
                g = g + share.unsqueeze(1) * w
            if self.rule.clips(feature.table):
                grad_sq, weight_sq = segment_sq_norms(segments, g, w)
                if feature.column_sharded:
                    column_parts.append((feature, samples, segments, g, grad_sq, weight_sq))
                    continue
                factor = self._factor(feature, segments, grad_sq, weight_sq)
                g = g * factor[segments.inverse].unsqueeze(1)
            grad[samples, cols] = g
            self._stash_rows(tbe, feature, segments, g)
        if column_parts:
            self._finish_column_sharded(tbe, column_parts, grad, batch)
        return grad

    def _stash_rows(self, tbe: _Tbe, feature: _Feature, segments: IdSegments, g: Tensor) -> None:
        """Keep the id's final gradient row for RowAdam, applied once the backward is done
        (updating the weights inside the backward would race FBGEMM's own kernel)."""
        if not tbe.row_adam:
            return
        summed = g.new_zeros(segments.unique_ids.numel(), g.shape[1])
        summed.index_add_(0, segments.inverse, g)
        row_offset = int(feature.shard.split("@")[1].split(",")[0])
        rows = segments.unique_ids - row_offset
        self._row_updates.append((feature.shard, tbe.weights[feature.shard], rows, summed))

    def _factor(self, feature: _Feature, segments, grad_sq: Tensor, weight_sq: Tensor) -> Tensor:
        zeta = self.rule.zeta_for_dim[feature.full_dim]
        return cowclip_scale(grad_sq, weight_sq, segments.counts, self.rule.r, zeta)

    def _finish_column_sharded(self, tbe: _Tbe, parts, grad: Tensor, batch: int) -> None:
        # Per-sample layout [table, (‖Σg‖², ‖w‖²), sample]: its shape is known on every rank
        # (the global batch), whichever shards a rank holds, so one all-reduce combines them.
        buffer = self._column_buffer(batch, grad.device)
        for feature, samples, segments, _, grad_sq, weight_sq in parts:
            slot = self.column_tables.index(feature.table)
            buffer[slot, 0, samples] += grad_sq[segments.inverse]
            buffer[slot, 1, samples] += weight_sq[segments.inverse]
        self._reduce_column_norms()
        for feature, samples, segments, g, _, _ in parts:
            slot = self.column_tables.index(feature.table)
            counts = segments.counts[segments.inverse]
            zeta = self.rule.zeta_for_dim[feature.full_dim]
            factor = cowclip_scale(
                buffer[slot, 0, samples], buffer[slot, 1, samples], counts, self.rule.r, zeta
            )
            g = g * factor.unsqueeze(1)
            grad[samples, feature.col_start : feature.col_end] = g
            self._stash_rows(tbe, feature, segments, g)

    def _column_buffer(self, batch: int, device: torch.device) -> Tensor:
        if self._pending.buffer is None:
            self._pending.buffer = torch.zeros(len(self.column_tables), 2, batch, device=device)
        return self._pending.buffer

    def _reduce_column_norms(self) -> None:
        if self.group is not None:
            dist.all_reduce(self._pending.buffer, group=self.group)
        self._pending.filled = True

    # ---- data-parallel tables: rewrite the all-reduced .grad after the backward ----

    def _record_replicated_ids(self, module, args, kwargs, output) -> None:
        if output.requires_grad:
            self._replicated_ids.append((kwargs["indices"], kwargs["offsets"]))

    def after_backward(self, global_rows: int, device: torch.device) -> None:
        """Per-step completion: the column-norm all-reduce for ranks that hold no column-wise
        shard, and the rewrite of data-parallel tables' gradients."""
        if self.column_tables and not self._pending.filled:
            self._column_buffer(global_rows, device)
            self._reduce_column_norms()
        self._pending = _PendingColumnNorms()
        if self.row_adam is not None:
            self.row_adam.begin_step()
        for (tbe, _), (indices, offsets) in zip(
            self._replicated, self._replicated_ids, strict=True
        ):
            self._rewrite_replicated(tbe, indices, offsets)
        self._replicated_ids.clear()
        for shard, weight, rows, grad in self._row_updates:
            self.row_adam.update(shard, weight, rows, grad)
        self._row_updates.clear()

    @torch.no_grad()
    def _rewrite_replicated(self, tbe: _Tbe, indices, offsets) -> None:
        batch = (offsets.numel() - 1) // len(tbe.features)
        lengths = offsets.diff()
        for feature in tbe.features:
            bags = slice(feature.index * batch, (feature.index + 1) * batch)
            if bool((lengths[bags] > 1).any()):
                raise CtrscaleError(
                    f"table {feature.table}: a sample looks up several ids; L2 and CowClip are "
                    "exact only for single-valued features, so multi-valued ones are refused"
                )
            grad = tbe.weights[feature.shard].grad
            weight = tbe.weights[feature.shard].detach()
            local_ids = indices[offsets[bags][lengths[bags].nonzero().squeeze(1)]]
            counts = torch.bincount(local_ids, minlength=weight.shape[0]).to(weight.dtype)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(counts)
            present = counts > 0
            if self.rule.l2 > 0:
                grad[present] += (2.0 * self.rule.l2) * weight[present]
            if self.rule.clips(feature.table):
                factor = cowclip_scale(
                    grad[present].square().sum(1),
                    weight[present].square().sum(1),
                    counts[present],
                    self.rule.r,
                    self.rule.zeta_for_dim[feature.full_dim],
                )
                grad[present] *= factor.unsqueeze(1)
            if tbe.row_adam:
                rows = present.nonzero().squeeze(1)
                self._row_updates.append((feature.shard, weight, rows, grad[rows].clone()))
                grad.zero_()  # RowAdam owns these rows; no torch optimizer may apply them again


def _agree_across_ranks(names: list[str]) -> list[str]:
    """The union of every rank's names, sorted: one layout for the per-step all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return names
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, names)
    return sorted({name for part in gathered for name in part})
