"""`EmbeddingUpdate`: how the rows of every embedding table change at each step.

Built once from the run's (scaled) embedding settings, the clip setting, the sharding choice
and the device, it decides the update path and owns everything on it:

* **fused**: FBGEMM applies the optimizer inside the TBE backward. Chosen when the optimizer
  has an FBGEMM kernel on this device and the update is lazy. With L2 or CowClip on, the
  TBE's output is cut from the graph in the forward; after the backward its gradient is
  rewritten per id and FBGEMM's backward is run on the rewritten gradient.
* **row**: ctrscale applies the optimizer's row form after the backward to the per-id
  gradient rows (lazy) or to every row (dense); FBGEMM's backward never runs. Chosen for Adam
  on CPU (FBGEMM has no CPU Adam kernel) and for dense semantics.

Data-parallel tables (replicated, with ordinary all-reduced `.grad`s) always take the row
form. All cross-rank work of a step — the all-reduce of column-split tables' norms and of
replicated tables' counts — happens in `after_backward`, which every rank calls at the same
point, once per step.

It also owns the FBGEMM fused arguments sharding needs, per-row optimizer state and its
checkpoint layout, and the embedding learning rate reported in the logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import CowClipDefinition, WeightDecayMode
from torch import Tensor, nn

from ctrscale.choices import (
    ClipMode,
    EmbeddingOptimizerName,
    ShardingChoice,
    UpdateSemantics,
)
from ctrscale.config import ConfigError, CowClipConfig, EmbeddingOptimConfig
from ctrscale.optim.cowclip import zeta_from_official_bound
from ctrscale.optim.embedding.gradients import (
    ClipCounter,
    GradientRule,
    GroupRows,
    combine_column_norms,
    flat_elements,
    per_id_rows,
    replicated_counts,
    rewrite_per_sample,
    rewrite_replicated,
)
from ctrscale.optim.embedding.layout import (
    FusedTbe,
    ReplicatedTables,
    embedding_modules,
    fused_tbe,
    is_replicated,
    replicated_tables,
    shard_key,
    sharded_like_weights,
    split_clipped_tables,
)
from ctrscale.optim.embedding.optimizers import State, build_embedding_optimizer


class UpdatePath(StrEnum):
    FUSED = "fused"
    ROW = "row"


@dataclass
class _Lookup:
    """One training forward of a TBE: its inputs, its output cut from the graph (`leaf`,
    whose `.grad` the backward fills) and, on the fused path, the output still attached to
    FBGEMM's backward."""

    indices: Tensor
    offsets: Tensor
    leaf: Tensor | None = None
    output: Tensor | None = None


class EmbeddingUpdate:
    def __init__(
        self,
        embedding: EmbeddingOptimConfig,
        cowclip: CowClipConfig,
        sharding: ShardingChoice,
        device: torch.device,
    ) -> None:
        self.optimizer = build_embedding_optimizer(embedding)
        self.l2 = embedding.l2
        self.semantics = embedding.semantics
        self.cowclip = cowclip
        kernel = self.optimizer.fused_kernel(device.type)
        lazy = self.semantics == UpdateSemantics.LAZY
        self.path = UpdatePath.FUSED if kernel is not None and lazy else UpdatePath.ROW
        self._fused_kernel = kernel
        _check_clip(cowclip, embedding, sharding, self.path)
        self.rule: GradientRule | None = None
        self._column_tables: list[str] = []
        self._column_group: dist.ProcessGroup | None = None
        self._fused: list[FusedTbe] = []
        self._replicated: list[ReplicatedTables] = []
        self._lookups: dict[int, _Lookup] = {}
        self._flat_states: dict[int, State] = {}
        self.shard_states: dict[str, State] = {}  # per `table@row,col`: checkpoints
        # Ids CowClip scaled down since the last training record (logged as a fraction).
        self.clip_counter = ClipCounter()

    # ---- before sharding ----

    def fused_params(self) -> dict[str, Any]:
        """The FBGEMM TBE arguments sharding passes to every fused table.

        L2 is not passed to FBGEMM: it is added to the gradient here, the same way on every
        device and for every optimizer, before CowClip. On the row path FBGEMM's optimizer is
        a zero-LR SGD whose backward never runs (the graph is cut at its output)."""
        if self.path == UpdatePath.ROW:
            return {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.0}
        params = {"optimizer": self._fused_kernel, **self.optimizer.fused_args()}
        if self.cowclip.mode == ClipMode.FBGEMM_ROWWISE:
            params["weight_decay_mode"] = WeightDecayMode.COWCLIP
            params["cowclip_regularization"] = CowClipDefinition(
                counter_halflife=-1,
                weight_norm_coefficient=self.cowclip.r,
                lower_bound=self.cowclip.zeta,
            )
        return params

    # ---- on the sharded model ----

    def attach(
        self, dmp: nn.Module, embedding_dims: set[int], first_order_tables: frozenset[str]
    ) -> None:
        """Find every TBE of `dmp` and hook the ones whose gradient this update handles."""
        self.rule = GradientRule(
            l2=self.l2,
            clip=self.cowclip.mode == ClipMode.PAPER,
            r=self.cowclip.r,
            zeta_for_dim={dim: self._zeta(dim) for dim in embedding_dims},
            unclipped_tables=first_order_tables,
        )
        found = list(embedding_modules(dmp))
        self._column_tables = _agree_across_ranks(split_clipped_tables(found, self.rule.clips))
        if self._column_tables and dist.is_initialized() and dist.get_world_size() > 1:
            # A group of its own: its all-reduce must not interleave with DDP's and TorchRec's
            # collectives on the default group.
            self._column_group = dist.new_group(backend=dist.get_backend())
        for emb, sharding_type in found:
            if self.path == UpdatePath.FUSED and not is_replicated(sharding_type):
                self.optimizer.keep_fused_step_count(emb.emb_module)
                self._share_fused_state(emb)
            if is_replicated(sharding_type):
                self._attach_replicated(emb)
            elif self.path == UpdatePath.ROW or self.rule.active:
                self._attach_fused(emb)

    def _share_fused_state(self, emb: nn.Module) -> None:
        """FBGEMM's element-wise optimizer state as the row form's state: one checkpoint layout
        on both paths, so a model moves between GPU (fused Adam) and CPU (row-form Adam) and
        between lazy and dense semantics with its optimizer state."""
        names = self.optimizer.fused_state_names
        if names is None:
            return
        states = emb.emb_module.split_optimizer_states()
        for table, views in zip(emb.config.embedding_tables, states, strict=True):
            self.shard_states[shard_key(table)] = dict(zip(names, views, strict=True))

    def _zeta(self, dim: int) -> float:
        return clip_floor(self.cowclip, dim)

    def _attach_fused(self, emb: nn.Module) -> None:
        tbe = fused_tbe(emb, self.rule.clips, self._column_tables)
        number = len(self._fused)
        self._fused.append(tbe)
        if self.path == UpdatePath.ROW:
            flat_state = self.optimizer.new_state(tbe.flat_weights)
            self._flat_states[number] = flat_state
            for shard in tbe.shards:
                start, size = shard.weight.storage_offset(), shard.weight.numel()
                self.shard_states[shard.key] = {
                    name: state[start : start + size].view_as(shard.weight)
                    for name, state in flat_state.items()
                }
        keep_output = self.path == UpdatePath.FUSED
        tbe.module.register_forward_hook(
            lambda module, args, kwargs, output: self._cut(number, kwargs, output, keep_output),
            with_kwargs=True,
        )

    def _cut(self, number: int, kwargs: dict, output: Tensor, keep_output: bool) -> Tensor | None:
        if not output.requires_grad:
            return None  # evaluation
        leaf = output.detach().requires_grad_()
        self._lookups[number] = _Lookup(
            kwargs["indices"], kwargs["offsets"], leaf, output if keep_output else None
        )
        return leaf

    def _attach_replicated(self, emb: nn.Module) -> None:
        tables = replicated_tables(emb)
        number = -1 - len(self._replicated)  # negative: apart from the fused TBEs' numbers
        self._replicated.append(tables)
        for shard in tables.shards:
            self.shard_states[shard.key] = self.optimizer.new_state(shard.weight)

        def record(module, args, kwargs, output) -> None:
            if output.requires_grad:
                self._lookups[number] = _Lookup(kwargs["indices"], kwargs["offsets"])

        tables.module.register_forward_hook(record, with_kwargs=True)

    # ---- every step ----

    def after_backward(self, global_rows: int) -> None:
        """The step's embedding update, after the backward of the global-batch mean loss."""
        self.optimizer.begin_step()
        parts = {
            number: self._per_id_rows(number, lookup)
            for number, lookup in self._lookups.items()
            if number >= 0 and lookup.leaf.grad is not None
        }
        if self._column_tables:
            device = self._fused[0].flat_weights.device if self._fused else torch.device("cpu")
            every_part = [part for group_parts in parts.values() for part in group_parts]
            combine_column_norms(
                every_part,
                len(self._column_tables),
                global_rows,
                device,
                self.rule,
                self._column_group,
            )
        for number, group_parts in parts.items():
            for part in group_parts:
                if part.factor is not None:
                    self.clip_counter.add(part.factor)
            self._apply_fused(number, group_parts)
        self._update_replicated()
        self._lookups.clear()

    def _per_id_rows(self, number: int, lookup: _Lookup) -> list[GroupRows]:
        return per_id_rows(
            self._fused[number],
            lookup.indices,
            lookup.offsets,
            lookup.leaf.detach(),
            lookup.leaf.grad,
            self.rule,
            need_sums=self.path == UpdatePath.ROW,
        )

    def _apply_fused(self, number: int, parts: list[GroupRows]) -> None:
        tbe, lookup = self._fused[number], self._lookups[number]
        grad = lookup.leaf.grad
        if self.path == UpdatePath.FUSED:
            batch = (lookup.offsets.numel() - 1) // tbe.num_features
            for part in parts:
                rewrite_per_sample(grad, part, self.rule, batch)
            torch.autograd.backward(lookup.output, grad)  # FBGEMM's backward and optimizer
            return
        state = self._flat_states[number]
        if self.semantics == UpdateSemantics.LAZY:
            for part in parts:
                self.optimizer.apply(tbe.flat_weights, state, flat_elements(part), part.final())
            return
        # Dense: every row moves; rows absent from the batch get only their L2 gradient.
        full = torch.zeros_like(tbe.flat_weights, dtype=torch.float32)
        if self.l2 > 0:
            full.add_(tbe.flat_weights, alpha=2.0 * self.l2)
        for part in parts:
            full[flat_elements(part)] = part.final().to(full.dtype)
        for shard in tbe.shards:
            start, size = shard.weight.storage_offset(), shard.weight.numel()
            shard_grad = full[start : start + size].view_as(shard.weight)
            self.optimizer.apply(shard.weight, self.shard_states[shard.key], None, shard_grad)

    def _update_replicated(self) -> None:
        if not self._replicated:
            return
        counts = [
            replicated_counts(tables, self._lookups[-1 - i].indices, self._lookups[-1 - i].offsets)
            for i, tables in enumerate(self._replicated)
        ]
        all_counts = torch.cat(counts)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(all_counts)  # one collective for every replicated table
        dense = self.semantics == UpdateSemantics.DENSE
        for tables, table_counts in zip(
            self._replicated, all_counts.split([c.numel() for c in counts]), strict=True
        ):
            rewritten = rewrite_replicated(
                tables, table_counts, self.rule, dense, self.clip_counter
            )
            for index, rows, grad in rewritten:
                shard = tables.shards[index]
                self.optimizer.apply(
                    shard.weight.detach(), self.shard_states[shard.key], rows, grad
                )

    # ---- checkpoints and reporting ----

    def state_tensors(self, model_state: dict[str, Any], fused_optimizer) -> dict[str, Any]:
        """The optimizer state a checkpoint holds, to save or to load into in place; the
        fused part (FBGEMM's own state) is loaded by `load_fused_state`."""
        tensors: dict[str, Any] = {"steps": self.optimizer.steps}
        if self.shard_states:
            tensors["rows"] = sharded_like_weights(model_state, self.shard_states)
        if self.path == UpdatePath.FUSED and self.optimizer.fused_state_names is None:
            tensors["fused"] = fused_optimizer.state_dict()
        return tensors

    def load_fused_state(self, tensors: dict[str, Any], fused_optimizer) -> None:
        if "fused" in tensors:
            fused_optimizer.load_state_dict(tensors["fused"])

    @property
    def learning_rate(self) -> float:
        return self.optimizer.lr

    def describe(self) -> dict[str, Any]:
        """What runs, for hyperparameters.json and the start-up message."""
        clip: dict[str, Any] = {"mode": self.cowclip.mode.value}
        if self.cowclip.mode != ClipMode.OFF:
            clip["r"] = self.cowclip.r
        if self.rule is not None and self.rule.clip:
            clip["zeta"] = {str(dim): zeta for dim, zeta in sorted(self.rule.zeta_for_dim.items())}
        return {
            "optimizer": self.optimizer.name.value,
            "lr": self.optimizer.lr,
            "l2": self.l2,
            "semantics": self.semantics.value,
            "path": self.path.value,
            "cowclip": clip,
        }


def clip_floor(cowclip: CowClipConfig, dim: int) -> float:
    """CowClip's ζ for tables of width `dim`: `optim.cowclip.zeta`, or the official code's
    r²·√d·bound when unset."""
    if cowclip.zeta is not None:
        return cowclip.zeta
    return zeta_from_official_bound(cowclip.r, dim, cowclip.bound)


def _check_clip(
    cowclip: CowClipConfig,
    embedding: EmbeddingOptimConfig,
    sharding: ShardingChoice,
    path: UpdatePath,
) -> None:
    """Combinations that cannot clip as asked are errors naming both keys."""
    if cowclip.mode != ClipMode.FBGEMM_ROWWISE:
        return
    if embedding.name != EmbeddingOptimizerName.ROWWISE_ADAGRAD:
        raise ConfigError(
            "optim.cowclip.mode=fbgemm_rowwise needs optim.embedding.name=rowwise_adagrad "
            f"(FBGEMM implements it only there; got {embedding.name})"
        )
    if sharding == ShardingChoice.DATA_PARALLEL:
        raise ConfigError(
            "optim.cowclip.mode=fbgemm_rowwise cannot clip with "
            "distributed.sharding_type=data_parallel: replicated tables are not updated by "
            "FBGEMM's fused optimizer; use optim.cowclip.mode=paper"
        )
    if path != UpdatePath.FUSED:
        raise ConfigError(
            "optim.cowclip.mode=fbgemm_rowwise runs inside FBGEMM's fused optimizer, which "
            f"optim.embedding.semantics={embedding.semantics} does not use; use "
            "optim.cowclip.mode=paper"
        )
    if cowclip.zeta is None:
        raise ConfigError(
            "optim.cowclip.mode=fbgemm_rowwise takes its lower bound from optim.cowclip.zeta; "
            "set it (the official-code `bound` convention applies to mode=paper only)"
        )


def _agree_across_ranks(names: list[str]) -> list[str]:
    """The union of every rank's names, sorted: one layout for the per-step all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return names
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, names)
    return sorted({name for part in gathered for name in part})
