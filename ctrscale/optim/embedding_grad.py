"""Exact per-id rewriting of embedding gradients on TorchRec-sharded tables: L2 and CowClip.

Where it acts: a forward hook on every FBGEMM table-batched-embedding module (TBE) inside the
sharded EmbeddingBagCollection records the ids the TBE looked up and hooks the TBE's pooled
output, whose gradient is rewritten before FBGEMM's backward — and the optimizer fused into
it — consume it. For table-, column- and row-wise shards the TBE runs on the rank that owns the
shard, after TorchRec's input all-to-all, over the *global* batch: ids, counts and per-id sums
are global, so N processes compute exactly what one process computes.

Why this is exact: for a single-valued feature the output row of sample s is w[id_s], and the
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

Optionally the same hooks also *apply* the embedding optimizer where FBGEMM cannot fuse it
(Adam on CPU; Adam on data-parallel tables): the rewritten per-id gradient rows are handed to
`RowAdam` after the backward, and FBGEMM's fused optimizer is a zero-LR SGD (see sharding.py).

All features of a TBE that share a width are processed together (one `unique`, one
`index_add` per group), so the per-step cost does not grow with the number of features.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import groupby
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ctrscale.errors import CtrscaleError
from ctrscale.optim.cowclip import IdSegments, cowclip_scale, segment_ids, segment_sums
from ctrscale.optim.row_adam import RowAdam

MULTI_VALUED = (
    "a sample looks up several ids in table {table}; L2, CowClip and RowAdam are exact only "
    "for single-valued features, so multi-valued ones are refused"
)


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


class _GradientTap(torch.autograd.Function):
    """Identity on a detached tensor whose backward gives the gradient to a callback.

    The input is detached so that the graph behind it (FBGEMM's backward) is not part of the
    backward at all: autograd runs a node even when every gradient reaching it is None, and
    FBGEMM's then materialises zeros and runs the whole kernel. `anchor`, an empty leaf that
    requires grad and never receives one, is what puts the tap itself into the graph.
    """

    @staticmethod
    def forward(ctx, detached: Tensor, anchor: Tensor, on_grad) -> Tensor:
        ctx.on_grad = on_grad
        return detached.view_as(detached)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.on_grad(grad)
        return None, None, None


class _Feature(NamedTuple):
    """Where one (table, input feature) of a TBE sits; bundled into `_Group`s."""

    kind: tuple[int, int, bool]  # (local width, full width, clipped): the grouping key
    position: int  # bag row in the TBE's offsets
    table: str
    input_feature: str  # the KJT key; a feature read by two tables has the same ids in both
    first_column: int  # in the pooled output
    key_offset: int  # makes (feature, id) keys distinct within the TBE
    row_offset: int  # first global row of the shard (row-wise shards)
    flat_offset: int  # where the shard's row 0 starts in the flat weight buffer
    column_slot: int  # among the clipped tables whose rows are split over shards; else -1


@dataclass
class _Group:
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
    row_offsets: Tensor  # first global row of the feature's shard (row-wise shards)
    flat_offsets: Tensor  # where the shard's row 0 starts in the flat weight buffer
    column_slots: Tensor
    full_dim: int
    clipped: bool
    column_range: tuple[int, int] | None  # flat_columns as a slice, when they are one range
    column_sharded: bool  # some feature's table has its rows split over shards (and clips)


@dataclass
class _Tbe:
    num_features: int
    groups: list[_Group]
    flat_weights: Tensor | None  # the TBE's weights as one flat buffer (RowAdam only)
    key: str
    anchor: Tensor | None = None  # RowAdam only: see _GradientTap


@dataclass
class _Lookups:
    """One group's single-valued lookups in a batch: n (slot, sample) pairs with their ids,
    the gradient rows reaching them [n, width], and each distinct id's weight row [ids, width]."""

    group: _Group
    present: Tensor  # [B, F_g]: which bags look an id up
    slot: Tensor
    sample: Tensor
    segments: IdSegments
    grad: Tensor
    weight: Tensor


def _group_lookups(
    group: _Group,
    indices: Tensor,
    offsets: Tensor,
    lengths: Tensor,
    rows: Tensor,
    grad: Tensor,
    batch: int,
    same_ids: _Lookups | None = None,
) -> _Lookups:
    """`same_ids`: an earlier group of this TBE that reads the same input features (a model's
    first-order tables read the fields' ids), whose grouping of samples by id is reused."""
    # Everything in [sample, feature] order, the pooled output's memory order, so gradient
    # and weight rows are read as whole rows front to back.
    if same_ids is None:
        group_lengths = lengths[group.features].T
        if bool((group_lengths > 1).any()):
            raise CtrscaleError(MULTI_VALUED.format(table=group.tables[0]))
        present = group_lengths == 1  # an empty bag (a missing value) looks nothing up
        sample, slot = present.nonzero(as_tuple=True)
        bag_starts = offsets[:-1].view(-1, batch)[group.features].T
        ids = indices[bag_starts[sample, slot]]
        segments = segment_ids(ids + group.key_offsets[slot])
    else:
        present, sample, slot = same_ids.present, same_ids.sample, same_ids.slot
        # Same samples per id; only the keys differ, by each feature's key offset.
        id_slot = slot[same_ids.segments.representative]
        shift = group.key_offsets[id_slot] - same_ids.group.key_offsets[id_slot]
        segments = replace(same_ids.segments, unique_ids=same_ids.segments.unique_ids + shift)
    grad_block = _columns(grad, group, batch)
    if sample.numel() == present.numel():
        per_sample = grad_block.reshape(sample.numel(), -1)
    else:
        per_sample = grad_block[present]
    at = segments.representative
    weight = _columns(rows, group, batch)[sample[at], slot[at]]  # a lookup's output row is w
    return _Lookups(group, present, slot, sample, segments, per_sample, weight)


def _columns(pooled: Tensor, group: _Group, batch: int) -> Tensor:
    """The group's columns of a pooled [B, C] tensor as [B, F_g, width]: a view when they are
    one range (a TBE lays out tables of one width side by side), else a copy."""
    if group.column_range is not None:
        start, stop = group.column_range
        return pooled[:, start:stop].view(batch, len(group.features), -1)
    return pooled.index_select(1, group.flat_columns).view(batch, len(group.features), -1)


def _lookups_with_types(sharded_ebc: nn.Module):
    for sharding_type, lookup in zip(
        sharded_ebc._sharding_types, sharded_ebc._lookups, strict=True
    ):
        yield sharding_type, getattr(lookup, "module", lookup)  # data-parallel: DDP-wrapped


def _sharded_ebcs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_lookups") and hasattr(m, "_sharding_types")]


def _shard_key(table) -> str:
    offsets = table.local_metadata.shard_offsets if table.local_metadata else (0, 0)
    return f"{table.name}@{offsets[0]},{offsets[1]}"


def _flat_buffer(views: list[Tensor]) -> Tensor:
    """The one storage behind a TBE's per-table weight views, as a flat tensor."""
    storage = views[0].untyped_storage()
    if any(v.untyped_storage().data_ptr() != storage.data_ptr() for v in views):
        raise CtrscaleError("a TBE keeps its tables in several buffers; RowAdam cannot update it")
    return torch.empty(0, dtype=views[0].dtype, device=views[0].device).set_(storage)


@dataclass
class EmbeddingGradientTransform:
    """Installs the hooks on a DistributedModelParallel model and keeps their per-step state."""

    rule: GradientRule
    row_adam: RowAdam | None = None
    column_tables: list[str] = field(default_factory=list)  # same order on every rank
    group: dist.ProcessGroup | None = None
    # RowAdam's moments per local shard ("table@row,col"), shaped like the shard: checkpoints.
    moment_shards: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    _column_norms: Tensor | None = None
    _column_norms_reduced: bool = False
    _replicated: list[tuple[nn.Module, bool]] = field(default_factory=list)
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
        found = [
            (emb, sharding_type)
            for sebc in _sharded_ebcs(dmp)
            for sharding_type, lookup in _lookups_with_types(sebc)
            for emb in lookup._emb_modules
        ]
        # Tables whose rows are split across shards: only those need the norms combined. A
        # column-wise table narrower than the shard width is one shard holding whole rows.
        column_tables = {
            table.name
            for emb, _ in found
            for table in emb.config.embedding_tables
            if rule.clips(table.name) and table.local_cols < table.embedding_dim
        }
        transform.column_tables = _agree_across_ranks(sorted(column_tables))
        if transform.column_tables and dist.is_initialized() and dist.get_world_size() > 1:
            # A group of its own: its one all-reduce per step must not interleave with DDP's
            # and TorchRec's collectives on the default group.
            transform.group = dist.new_group(backend=dist.get_backend())
        for number, (emb, sharding_type) in enumerate(found):
            if sharding_type == "data_parallel":
                transform._install_replicated(emb, uses_row_adam=row_adam is not None)
            else:
                uses_row_adam = row_adam is not None and not fused_adam
                transform._install_sharded(emb, f"tbe{number}", uses_row_adam)
        return transform

    # ---- fused shards: rewrite the pooled output's gradient before FBGEMM's backward ----

    def _install_sharded(self, emb: nn.Module, key: str, row_adam: bool):
        if not row_adam and not self.rule.active:
            return  # FBGEMM's fused Adam takes the gradient as it is
        views = emb.emb_module.split_embedding_weights()
        flat = _flat_buffer(views) if row_adam else None
        if row_adam:
            self.row_adam.add_shard(key, flat)
            moments = self.row_adam.moments[key]
            for table, view in zip(emb.config.embedding_tables, views, strict=True):
                start, size = view.storage_offset(), view.numel()
                self.moment_shards[_shard_key(table)] = tuple(
                    m[start : start + size].view_as(view) for m in moments
                )
        per_feature, column, key_offset = [], 0, 0
        for table, view in zip(emb.config.embedding_tables, views, strict=True):
            row_offset = table.local_metadata.shard_offsets[0] if table.local_metadata else 0
            for input_feature in table.feature_names:
                per_feature.append(
                    _Feature(
                        kind=(table.local_cols, table.embedding_dim, self.rule.clips(table.name)),
                        position=len(per_feature),
                        table=table.name,
                        input_feature=input_feature,
                        first_column=column,
                        key_offset=key_offset - row_offset,
                        row_offset=row_offset,
                        flat_offset=view.storage_offset(),
                        column_slot=self.column_tables.index(table.name)
                        if table.name in self.column_tables
                        else -1,
                    )
                )
                column += table.local_cols
                key_offset += table.local_rows
        tbe = _Tbe(len(per_feature), _groups(per_feature, views[0].device), flat, key)
        if row_adam:
            tbe.anchor = torch.empty(0, device=flat.device, requires_grad=True)
        emb.emb_module.register_forward_hook(
            lambda module, args, kwargs, out: self._hook_output(tbe, kwargs, out),
            with_kwargs=True,
        )

    def _hook_output(self, tbe: _Tbe, kwargs: dict, output: Tensor) -> Tensor | None:
        if not output.requires_grad:
            return None
        indices, offsets = kwargs["indices"], kwargs["offsets"]
        rows = output.detach()
        if tbe.flat_weights is not None:
            # RowAdam updates this TBE: FBGEMM's backward (a zero-LR SGD) would only cost time,
            # so the graph is cut here and a tap hands the gradient to the rewrite.
            return _GradientTap.apply(
                rows, tbe.anchor, lambda grad: self._rewrite(tbe, indices, offsets, rows, grad)
            )
        output.register_hook(lambda grad: self._rewrite(tbe, indices, offsets, rows, grad))
        return None

    def _rewrite(
        self, tbe: _Tbe, indices: Tensor, offsets: Tensor, rows: Tensor, grad: Tensor
    ) -> Tensor | None:
        # Under RowAdam's tap only the per-id rows are needed; otherwise FBGEMM's backward gets
        # per-sample rows whose per-id sums are the rewritten gradient rows.
        rewritten = None if tbe.flat_weights is not None else grad.clone()
        batch = (offsets.numel() - 1) // tbe.num_features
        lengths = offsets.diff().view(tbe.num_features, batch)
        deferred = []
        by_input: dict[tuple[str, ...], _Lookups] = {}
        for group in tbe.groups:
            lookups = _group_lookups(
                group, indices, offsets, lengths, rows, grad, batch,
                by_input.get(group.input_features),
            )  # fmt: skip
            by_input.setdefault(group.input_features, lookups)
            # The per-id sum is the gradient row CowClip clips and RowAdam applies; the L2
            # gradient 2λw is added once per id, and every later step is O(ids), not O(samples).
            summed = None
            if group.clipped or rewritten is None:
                summed = segment_sums(lookups.segments, lookups.grad)
                if self.rule.l2 > 0:
                    summed.add_(lookups.weight, alpha=2.0 * self.rule.l2)
            factor = None
            if group.clipped:
                grad_sq, weight_sq = summed.square().sum(1), lookups.weight.square().sum(1)
                if group.column_sharded:
                    deferred.append((tbe, group, lookups, summed, grad_sq, weight_sq))
                    continue
                zeta = self.rule.zeta_for_dim[group.full_dim]
                factor = cowclip_scale(
                    grad_sq, weight_sq, lookups.segments.counts, self.rule.r, zeta
                )
            self._apply(tbe, group, lookups, summed, factor, rewritten, batch)
        if deferred:
            self._finish_column_sharded(deferred, rewritten, batch, grad.device)
        return rewritten

    def _apply(
        self,
        tbe: _Tbe,
        group: _Group,
        lookups: _Lookups,
        summed: Tensor | None,
        factor: Tensor | None,
        rewritten: Tensor | None,
        batch: int,
    ) -> None:
        if rewritten is None:
            self._stash_rows(
                tbe, group, lookups, summed if factor is None else summed * factor[:, None]
            )
            return
        segments = lookups.segments
        per_sample = lookups.grad
        if self.rule.l2 > 0:
            share = (2.0 * self.rule.l2) / segments.counts.to(per_sample.dtype)
            per_sample = per_sample + (share.unsqueeze(1) * lookups.weight)[segments.inverse]
        if factor is not None:
            per_sample = per_sample * factor[segments.inverse].unsqueeze(1)
        block = _columns(rewritten, group, batch)
        block[lookups.sample, lookups.slot] = per_sample
        if group.column_range is None:  # `block` is a copy
            rewritten.index_copy_(1, group.flat_columns, block.view(batch, -1))

    def _stash_rows(self, tbe: _Tbe, group: _Group, lookups: _Lookups, summed: Tensor) -> None:
        """Keep each id's final gradient row for RowAdam, applied once the backward is done
        (updating the weights inside the backward would race FBGEMM's own kernel)."""
        segments = lookups.segments
        id_slot = lookups.slot[segments.representative]
        local_rows = segments.unique_ids - group.key_offsets[id_slot] - group.row_offsets[id_slot]
        width = summed.shape[1]
        start = group.flat_offsets[id_slot] + local_rows * width
        elements = start.unsqueeze(1) + torch.arange(width, device=start.device)
        self._row_updates.append((tbe.key, tbe.flat_weights, elements, summed))

    def _finish_column_sharded(
        self, deferred, rewritten: Tensor | None, batch: int, device: torch.device
    ) -> None:
        # Per-sample layout [table, (‖Σg‖², ‖w‖²), sample]: its shape is known on every rank
        # (the global batch), whichever shards a rank holds, so one all-reduce combines them.
        norms = self._column_buffer(batch, device)
        for _, group, lookups, _, grad_sq, weight_sq in deferred:
            table, inverse = group.column_slots[lookups.slot], lookups.segments.inverse
            first, second = torch.zeros_like(table), torch.ones_like(table)
            norms.index_put_((table, first, lookups.sample), grad_sq[inverse], accumulate=True)
            norms.index_put_((table, second, lookups.sample), weight_sq[inverse], accumulate=True)
        self._reduce_column_norms()
        for tbe, group, lookups, summed, _, _ in deferred:
            # Every sample of an id now holds the id's full norms; read them at one sample.
            at = lookups.segments.representative
            table, sample = group.column_slots[lookups.slot[at]], lookups.sample[at]
            factor = cowclip_scale(
                norms[table, 0, sample],
                norms[table, 1, sample],
                lookups.segments.counts,
                self.rule.r,
                self.rule.zeta_for_dim[group.full_dim],
            )
            self._apply(tbe, group, lookups, summed, factor, rewritten, batch)

    def _column_buffer(self, batch: int, device: torch.device) -> Tensor:
        if self._column_norms is None:
            self._column_norms = torch.zeros(len(self.column_tables), 2, batch, device=device)
        return self._column_norms

    def _reduce_column_norms(self) -> None:
        if self.group is not None:
            dist.all_reduce(self._column_norms, group=self.group)
        self._column_norms_reduced = True

    # ---- data-parallel tables: rewrite the all-reduced .grad after the backward ----

    def _install_replicated(self, emb: nn.Module, uses_row_adam: bool) -> None:
        self._replicated.append((emb, uses_row_adam))
        if uses_row_adam:
            by_table = dict(emb.named_parameters_by_table())
            for table in emb.config.embedding_tables:
                key = _shard_key(table)
                self.row_adam.add_shard(key, by_table[table.name])
                self.moment_shards[key] = self.row_adam.moments[key]
        emb.emb_module.register_forward_hook(self._record_replicated_ids, with_kwargs=True)

    def _record_replicated_ids(self, module, args, kwargs, output) -> None:
        if output.requires_grad:
            self._replicated_ids.append((kwargs["indices"], kwargs["offsets"]))

    def after_backward(self, global_rows: int, device: torch.device) -> None:
        """Per-step completion: the column-norm all-reduce for ranks that hold no column-wise
        shard, the rewrite of data-parallel tables' gradients, and RowAdam's updates."""
        if self.column_tables and not self._column_norms_reduced:
            self._column_buffer(global_rows, device)
            self._reduce_column_norms()
        self._column_norms, self._column_norms_reduced = None, False
        if self.row_adam is not None:
            self.row_adam.begin_step()
        for (emb, uses_row_adam), (indices, offsets) in zip(
            self._replicated, self._replicated_ids, strict=True
        ):
            self._rewrite_replicated(emb, uses_row_adam, indices, offsets)
        self._replicated_ids.clear()
        for key, weight, index, grad in self._row_updates:
            self.row_adam.update(key, weight, index, grad)
        self._row_updates.clear()

    @torch.no_grad()
    def _rewrite_replicated(self, emb: nn.Module, uses_row_adam: bool, indices, offsets) -> None:
        # Replicated tables are small (that is why they are replicated): per-table dense work
        # on their full gradient is what data-parallel costs anyway.
        by_table = dict(emb.named_parameters_by_table())  # views whose .grad is the table's
        features = [(t, f) for t in emb.config.embedding_tables for f in t.feature_names]
        batch = (offsets.numel() - 1) // len(features)
        lengths = offsets.diff()
        for index, (table, _) in enumerate(features):
            bags = slice(index * batch, (index + 1) * batch)
            if bool((lengths[bags] > 1).any()):
                raise CtrscaleError(MULTI_VALUED.format(table=table.name))
            parameter = by_table[table.name]
            grad, weight = parameter.grad, parameter.detach()
            local_ids = indices[offsets[bags][lengths[bags].nonzero().squeeze(1)]]
            counts = torch.bincount(local_ids, minlength=weight.shape[0]).to(weight.dtype)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(counts)
            present = counts > 0
            if self.rule.l2 > 0:
                grad[present] += (2.0 * self.rule.l2) * weight[present]
            if self.rule.clips(table.name):
                factor = cowclip_scale(
                    grad[present].square().sum(1),
                    weight[present].square().sum(1),
                    counts[present],
                    self.rule.r,
                    self.rule.zeta_for_dim[table.embedding_dim],
                )
                grad[present] *= factor.unsqueeze(1)
            if uses_row_adam:
                rows = present.nonzero().squeeze(1)
                self._row_updates.append((_shard_key(table), weight, rows, grad[rows].clone()))
                grad.zero_()  # RowAdam owns these rows; no torch optimizer may apply them again


def _groups(per_feature: list[_Feature], device: torch.device) -> list[_Group]:
    """Bundle features by (local width, full width, clipped) into `_Group`s on `device`."""
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
            _Group(
                tables=[m.table for m in members],
                input_features=tuple(m.input_feature for m in members),
                features=long([m.position for m in members]),
                flat_columns=(
                    long(first_columns).unsqueeze(1) + long(list(range(width)))
                ).flatten(),
                key_offsets=long([m.key_offset for m in members]),
                row_offsets=long([m.row_offset for m in members]),
                flat_offsets=long([m.flat_offset for m in members]),
                column_slots=long(column_slots),
                full_dim=full_dim,
                clipped=clipped,
                column_range=(first_columns[0], first_columns[-1] + width) if one_range else None,
                column_sharded=any(slot >= 0 for slot in column_slots),
            )
        )
    return groups


def _agree_across_ranks(names: list[str]) -> list[str]:
    """The union of every rank's names, sorted: one layout for the per-step all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return names
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, names)
    return sorted({name for part in gathered for name in part})
