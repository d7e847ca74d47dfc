"""Per-id embedding gradients of one step: L2, CowClip and the rows an optimizer applies.

The input is what a TBE's pooled output received in the backward: one gradient row per
(sample, feature). For table-, column- and row-wise shards the TBE runs on the rank that
owns the shard, after TorchRec's input all-to-all, over the *global* batch: ids, counts and
per-id sums are global, so N processes compute exactly what one process computes.

Why this is exact: for a single-valued feature the output row of sample s is w[id_s], and the
gradient reaching it is s's contribution to the id's gradient row. The id's row gradient is
the sum over its samples (`segment_sums`, O(samples) once); adding 2λw and clipping are then
O(distinct ids). To hand the result to FBGEMM's fused backward instead, each sample's row
gets its share: + 2λ·w/cnt, × the id's CowClip factor — their sums are the rewritten row.
Multi-valued (pooled) bags would need a factor per id inside one pooled row, so they are
refused, never approximated.

Column-wise shards hold slices of a row: each shard's partial squared norms of Σg and w are
summed over the table's shards (`combine_column_norms`, one all-reduce per step) before any
factor is computed. Data-parallel tables see only the local batch in their backward; they are
rewritten after the backward on their all-reduced `.grad`, with all-reduced counts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from ctrscale.errors import CtrscaleError
from ctrscale.optim.cowclip import IdSegments, cowclip_scale, segment_ids, segment_sums
from ctrscale.optim.embedding.layout import FusedTbe, Group, ReplicatedTables

MULTI_VALUED = (
    "a sample looks up several ids in table {table}; L2, CowClip and the row-wise embedding "
    "optimizers are exact only for single-valued features, so multi-valued ones are refused"
)


@dataclass(frozen=True)
class GradientRule:
    """What every table's gradient gets: L2 coefficient λ and CowClip (r, ζ per dim)."""

    l2: float
    clip: bool
    r: float
    zeta_for_dim: dict[int, float]  # ζ by full embedding dim (official convention depends on d)
    unclipped_tables: frozenset[str]  # first-order (wide) tables: the paper does not clip them

    def clips(self, table: str) -> bool:
        return self.clip and table not in self.unclipped_tables

    @property
    def active(self) -> bool:
        return self.clip or self.l2 > 0


@dataclass
class ClipCounter:
    """How many ids CowClip scaled down, out of how many it saw, since the last `take()`.
    Kept as tensors on the ids' device: counting costs no synchronisation per step."""

    clipped: Tensor | None = None
    seen: Tensor | None = None

    def add(self, factor: Tensor) -> None:
        clipped = (factor < 1).sum()
        if self.clipped is None:
            self.clipped, self.seen = clipped, torch.zeros_like(clipped)
        else:
            self.clipped += clipped
        self.seen += factor.numel()

    def take(self) -> tuple[Tensor | float, Tensor | float]:
        counts = (0.0, 0.0) if self.clipped is None else (self.clipped, self.seen)
        self.clipped = self.seen = None
        return counts


@dataclass
class Lookups:
    """One group's single-valued lookups in a batch: n (slot, sample) pairs with their ids,
    the gradient rows reaching them [n, width], and each distinct id's weight row [ids, width]."""

    group: Group
    present: Tensor  # [B, F_g]: which bags look an id up
    slot: Tensor
    sample: Tensor
    segments: IdSegments
    grad: Tensor
    weight: Tensor


@dataclass
class GroupRows:
    """A group's per-id result: the final gradient row of every distinct id is
    `summed · factor` (either may be None: not needed on this path / not clipped)."""

    lookups: Lookups
    summed: Tensor | None  # Σ of the id's sample rows + 2λw
    grad_sq: Tensor | None  # ‖summed‖² and ‖w‖² (partial on column shards), for the clip
    weight_sq: Tensor | None
    factor: Tensor | None = None

    @property
    def group(self) -> Group:
        return self.lookups.group

    def final(self) -> Tensor:
        return self.summed if self.factor is None else self.summed * self.factor[:, None]


def columns(pooled: Tensor, group: Group, batch: int) -> Tensor:
    """The group's columns of a pooled [B, C] tensor as [B, F_g, width]: a view when they are
    one range (a TBE lays out tables of one width side by side), else a copy."""
    if group.column_range is not None:
        start, stop = group.column_range
        return pooled[:, start:stop].view(batch, len(group.features), -1)
    return pooled.index_select(1, group.flat_columns).view(batch, len(group.features), -1)


def group_lookups(
    group: Group,
    indices: Tensor,
    offsets: Tensor,
    rows: Tensor,
    grad: Tensor,
    batch: int,
    same_ids: Lookups | None = None,
) -> Lookups:
    """`rows`: the TBE's pooled output (each lookup's row is w). `same_ids`: an earlier group of
    this TBE that reads the same input features (a model's first-order tables read the fields'
    ids), whose grouping of samples by id is reused."""
    # Everything in [sample, feature] order, the pooled output's memory order, so gradient
    # and weight rows are read as whole rows front to back.
    if same_ids is None:
        lengths = offsets.diff().view(-1, batch)
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
    grad_block = columns(grad, group, batch)
    if sample.numel() == present.numel():
        per_sample = grad_block.reshape(sample.numel(), -1)
    else:  # integer indices, in the mask's order: a boolean mask would wait for the device
        per_sample = grad_block[sample, slot]
    at = segments.representative
    weight = columns(rows, group, batch)[sample[at], slot[at]]  # a lookup's output row is w
    return Lookups(group, present, slot, sample, segments, per_sample, weight)


def per_id_rows(
    tbe: FusedTbe,
    indices: Tensor,
    offsets: Tensor,
    rows: Tensor,
    grad: Tensor,
    rule: GradientRule,
    need_sums: bool,
) -> list[GroupRows]:
    """Every group's per-id rows; factors of groups on column-split tables stay None until
    `combine_column_norms`. `need_sums`: an optimizer applies the rows (else only clipped
    groups need their sums, the fused backward taking per-sample rows)."""
    batch = (offsets.numel() - 1) // tbe.num_features
    by_input: dict[tuple[str, ...], Lookups] = {}
    result = []
    for group in tbe.groups:
        lookups = group_lookups(
            group, indices, offsets, rows, grad, batch, by_input.get(group.input_features)
        )
        by_input.setdefault(group.input_features, lookups)
        summed = grad_sq = weight_sq = factor = None
        if group.clipped or need_sums:
            # The per-id sum is the gradient row CowClip clips and an optimizer applies; the
            # L2 gradient 2λw is added once per id.
            summed = segment_sums(lookups.segments, lookups.grad)
            if rule.l2 > 0:
                summed.add_(lookups.weight, alpha=2.0 * rule.l2)
        if group.clipped:
            grad_sq, weight_sq = summed.square().sum(1), lookups.weight.square().sum(1)
            if not group.column_sharded:
                zeta = rule.zeta_for_dim[group.full_dim]
                factor = cowclip_scale(grad_sq, weight_sq, lookups.segments.counts, rule.r, zeta)
        result.append(GroupRows(lookups, summed, grad_sq, weight_sq, factor))
    return result


def combine_column_norms(
    parts: list[GroupRows],
    num_tables: int,
    batch: int,
    device: torch.device,
    rule: GradientRule,
    group: dist.ProcessGroup | None,
) -> None:
    """Factors of the clipped groups whose tables are split over column shards, from the
    partial norms summed over every shard of every rank: one all-reduce, which every rank
    issues once per step at the same point (ranks without such shards contribute zeros).

    Layout [table, (‖Σg‖², ‖w‖²), sample]: its shape is known on every rank (the global
    batch), whichever shards a rank holds."""
    norms = torch.zeros(num_tables, 2, batch, device=device)
    split = [part for part in parts if part.group.column_sharded and part.grad_sq is not None]
    for part in split:
        lookups = part.lookups
        table, inverse = part.group.column_slots[lookups.slot], lookups.segments.inverse
        first, second = torch.zeros_like(table), torch.ones_like(table)
        norms.index_put_((table, first, lookups.sample), part.grad_sq[inverse], accumulate=True)
        norms.index_put_((table, second, lookups.sample), part.weight_sq[inverse], accumulate=True)
    if group is not None:
        dist.all_reduce(norms, group=group)
    for part in split:
        # Every sample of an id now holds the id's full norms; read them at one sample.
        lookups = part.lookups
        at = lookups.segments.representative
        table, sample = part.group.column_slots[lookups.slot[at]], lookups.sample[at]
        part.factor = cowclip_scale(
            norms[table, 0, sample],
            norms[table, 1, sample],
            lookups.segments.counts,
            rule.r,
            rule.zeta_for_dim[part.group.full_dim],
        )


def rewrite_per_sample(grad: Tensor, part: GroupRows, rule: GradientRule, batch: int) -> None:
    """Rewrite `grad` (the pooled output's gradient) in place so that the per-id sums of
    the group's sample rows are the final rows: + 2λw/cnt and × the factor, per sample."""
    lookups, group = part.lookups, part.group
    segments = lookups.segments
    per_sample = lookups.grad
    if rule.l2 > 0:
        share = (2.0 * rule.l2) / segments.counts.to(per_sample.dtype)
        per_sample = per_sample + (share.unsqueeze(1) * lookups.weight)[segments.inverse]
    if part.factor is not None:
        per_sample = per_sample * part.factor[segments.inverse].unsqueeze(1)
    if per_sample is lookups.grad:
        return  # neither L2 nor a clip: the sample rows already sum to the final rows
    block = columns(grad, group, batch)
    block[lookups.sample, lookups.slot] = per_sample
    if group.column_range is None:  # `block` is a copy
        grad.index_copy_(1, group.flat_columns, block.view(batch, -1))


def flat_elements(part: GroupRows) -> Tensor:
    """[ids, width]: where each distinct id's row lies in the TBE's flat weight buffer."""
    lookups, group = part.lookups, part.group
    segments = lookups.segments
    id_slot = lookups.slot[segments.representative]
    local_rows = segments.unique_ids - group.key_offsets[id_slot]
    width = lookups.weight.shape[1]
    start = group.flat_offsets[id_slot] + local_rows * width
    return start.unsqueeze(1) + torch.arange(width, device=start.device)


def replicated_counts(tables: ReplicatedTables, indices: Tensor, offsets: Tensor) -> Tensor:
    """Local id counts of every table of a data-parallel TBE, concatenated in table order: one
    bincount for all tables, so the host waits for the device a fixed number of times per step
    however many tables there are."""
    sizes = [table.num_embeddings for table, _ in tables.features]
    batch = (offsets.numel() - 1) // len(sizes)
    lengths = offsets.diff()
    if bool((lengths > 1).any()):
        first = int((lengths > 1).nonzero()[0, 0]) // batch
        raise CtrscaleError(MULTI_VALUED.format(table=tables.features[first][0].name))
    bags = lengths.nonzero().squeeze(1)  # an empty bag (a missing value) looks nothing up
    table_starts = torch.tensor([0, *itertools.accumulate(sizes)][:-1]).to(indices.device)
    keys = indices[offsets[bags]] + table_starts[bags // batch]
    return torch.bincount(keys, minlength=sum(sizes))


@torch.no_grad()
def rewrite_replicated(
    tables: ReplicatedTables,
    counts: Tensor,
    rule: GradientRule,
    dense: bool,
    clip_counter: ClipCounter,
) -> list[tuple[int, Tensor | None, Tensor]]:
    """L2 and CowClip on the all-reduced `.grad` of each data-parallel table, given global
    counts (concatenated as `replicated_counts`). Returns (shard index, rows, gradient rows)
    for the optimizer — rows=None and the whole table's gradient under dense semantics — and
    clears each `.grad`: the embedding optimizer owns these tables."""
    # Replicated tables are small (that is why they are replicated): per-table dense work
    # on their full gradient is what data-parallel costs anyway.
    updates, start = [], 0
    rows_per_table = _rows_per_table(tables, counts)
    for index, (shard, rows) in enumerate(zip(tables.shards, rows_per_table, strict=True)):
        parameter = shard.weight
        grad, weight = parameter.grad, parameter.detach()
        table_counts = counts[start : start + weight.shape[0]]
        start += weight.shape[0]
        if rule.l2 > 0:
            if dense:
                grad.add_(weight, alpha=2.0 * rule.l2)
            else:
                grad[rows] += (2.0 * rule.l2) * weight[rows]
        if rule.clips(shard.table):
            factor = cowclip_scale(
                grad[rows].square().sum(1),
                weight[rows].square().sum(1),
                table_counts[rows],
                rule.r,
                rule.zeta_for_dim[weight.shape[1]],
            )
            clip_counter.add(factor)
            grad[rows] *= factor.unsqueeze(1).to(grad.dtype)
        updates.append((index, None, grad.clone()) if dense else (index, rows, grad[rows]))
    for shard in tables.shards:
        # After the loop: the tables' `.grad`s are views of one TBE gradient that this clears.
        shard.weight.grad = None
    return updates


def _rows_per_table(tables: ReplicatedTables, counts: Tensor) -> list[Tensor]:
    """Each table's looked-up rows (local indices) from the concatenated counts, with two
    host waits in all (the nonzero and the split sizes) instead of one per table."""
    sizes = [shard.weight.shape[0] for shard in tables.shards]
    looked_up = counts.nonzero().squeeze(1)
    ends = torch.tensor(list(itertools.accumulate(sizes))).to(counts.device)
    table = torch.bucketize(looked_up, ends, right=True)
    per_table = torch.bincount(table, minlength=len(sizes)).tolist()
    starts = [0, *itertools.accumulate(sizes)][:-1]
    return [rows - start for rows, start in zip(looked_up.split(per_table), starts, strict=True)]
