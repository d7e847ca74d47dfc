"""`ParquetBatchLoader`: Parquet row groups → TorchRec `Batch`es of exactly `batch_size` rows.

It owns the public API and what ties the parts together: the arguments and `[data]` config,
slicing global batches across ranks, and the resumable cursor. The parts are its siblings:
files and row groups (`dataset.py`), the holdout split (`holdout.py`), the epoch's order and
shuffle buffer (`shuffle.py`), decoding (`decode.py`), batch arrays (`batches.py`), checks
(`validation.py`) and the prefetch thread (`prefetch.py`).

The row order of an epoch is a pure function of (seed, epoch, Parquet row counts):

1. the row groups are permuted with a generator seeded by (seed, epoch);
2. consecutive row groups are grouped into windows of about `shuffle_buffer_rows` rows;
3. the rows a window keeps (after the holdout split) are permuted with a generator seeded by
   (seed, epoch, window index);
4. the concatenation of the windows (the epoch's stream) is cut into global batches of
   `batch_size` rows, and rank r of N takes
   - replicated (the default): rows [r·B/N, (r+1)·B/N) of every global batch. Every rank
     decodes the whole stream to find its slices: batches identical to one process's, but the
     dataset is decoded N times, so the job's rate is one process's decode rate;
   - sharded (`sharded_decode`): the next B/N rows of its own contiguous share of the stream,
     rank r's share starting where rank r−1's ends. Each rank decodes only its share (and at
     most the two windows it shares with its neighbours): N times the decode rate, every
     row still once per epoch and every global batch exactly B rows, in another order.

Because of that, `num_batches()` needs only Parquet footers (and the holdout hash), and a
cursor (epoch, batches done) is resumed by reading only the window that contains it, without
communication between the ranks.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Generator, Iterator, Sequence
from typing import Any, Literal

import numpy as np
from torchrec.datasets.utils import Batch

from ctrscale.config import DataConfig
from ctrscale.data import schema
from ctrscale.data.loader.batches import KjtLayout
from ctrscale.data.loader.dataset import (
    open_files,
    resolve_sources,
    row_groups,
    table_sizes_from_metadata,
)
from ctrscale.data.loader.decode import WindowDecoder
from ctrscale.data.loader.frequency import count_ids
from ctrscale.data.loader.holdout import HoldoutSplit, Split
from ctrscale.data.loader.prefetch import prefetched
from ctrscale.data.loader.shuffle import EpochOrder, WindowReader
from ctrscale.data.loader.validation import Validator, check_arguments
from ctrscale.errors import CtrscaleError


class ParquetBatchLoader:
    """One epoch of TorchRec `Batch`es per iteration; see the module docstring for the order.

    `batch_size` is the global batch; this rank yields `batch_size // world_size` rows per
    batch (the final partial batch, kept with `drop_last=False`, is split as evenly as
    possible, so a rank may get an empty batch). Every rank yields `num_batches()` batches.

    The loader is a cursor over (epoch, batches done): iterating yields the rest of the
    current epoch and then moves to the start of the next one; `set_epoch` and
    `load_state_dict` move it. One iteration at a time.
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        table_sizes: dict[str, int] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer_rows: int = 1_048_576,
        drop_last: bool = True,
        prefetch_batches: int = 2,
        split: Split | None = None,
        holdout_fraction: float = 0.0,
        holdout_seed: int = 0,
        extra_columns: Sequence[str] = (),
        sharded_decode: bool = False,
    ) -> None:
        check_arguments(
            batch_size, rank, world_size, shuffle_buffer_rows, prefetch_batches, split,
            holdout_fraction,
        )  # fmt: skip
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.drop_last = drop_last
        self.prefetch_batches = prefetch_batches
        # Page-locked batches for an asynchronous copy to a GPU (set by the trainer on CUDA).
        self.pin_memory = False
        self.split = split
        self.holdout_fraction = holdout_fraction
        self.holdout_seed = holdout_seed
        self.extra_columns = tuple(dict.fromkeys(extra_columns))
        # With one rank both layouts are the same stream.
        self.sharded_decode = sharded_decode and world_size > 1

        self._files = open_files(resolve_sources(paths), self.extra_columns)
        self._row_groups = row_groups(self._files)
        self.table_sizes = (
            schema.validate_table_sizes(table_sizes, "ParquetBatchLoader(table_sizes=...)")
            if table_sizes is not None
            else table_sizes_from_metadata(self._files)
        )
        arrow_schema = self._files[0].metadata.schema.to_arrow_schema()
        self._extra_dtypes = {
            name: np.dtype(arrow_schema.field(name).type.to_pandas_dtype())
            for name in self.extra_columns
        }
        self._holdout = HoldoutSplit(self._files, split, holdout_fraction, holdout_seed)
        self._kept_counts: np.ndarray | None = None
        self._decoder = WindowDecoder(
            self._files,
            self._row_groups,
            self._extra_dtypes,
            Validator(self.table_sizes),
            self._holdout.kept_mask,
        )
        self._kjt_layout = KjtLayout(self.local_batch_size)
        self._active: weakref.ref[Generator[Batch, None, None]] | None = None
        self._epoch = 0
        self._batches_done = 0

    @classmethod
    def from_config(
        cls,
        data_cfg: DataConfig,
        split: Literal["train", "eval"],
        rank: int = 0,
        world_size: int = 1,
        *,
        seed: int,
        batch_size: int | None = None,
        extra_columns: Sequence[str] = (),
        sharded_decode: bool = False,
    ) -> ParquetBatchLoader:
        """The train or eval loader a `[data]` config describes.

        Eval data is `data.eval` if given, else the `holdout_fraction` of `data.train` that the
        train loader leaves out. Eval never shuffles and keeps the last partial batch, so every
        eval row is seen exactly once.
        """
        if not data_cfg.train and (split == "train" or not data_cfg.eval):
            raise CtrscaleError("data.train is empty: give the training Parquet files")
        common: dict[str, Any] = dict(
            rank=rank,
            world_size=world_size,
            seed=seed,
            shuffle_buffer_rows=data_cfg.shuffle_buffer_rows,
            prefetch_batches=data_cfg.prefetch_batches,
            holdout_fraction=data_cfg.holdout_fraction,
            holdout_seed=data_cfg.holdout_seed,
            extra_columns=extra_columns,
            sharded_decode=sharded_decode,
        )
        holds_out = not data_cfg.eval and data_cfg.holdout_fraction > 0
        if split == "train":
            return cls(
                data_cfg.train,
                batch_size or data_cfg.batch_size,
                shuffle=data_cfg.shuffle,
                drop_last=data_cfg.drop_last,
                split="train" if holds_out else None,
                **common,
            )
        if split != "eval":
            raise CtrscaleError(f"split={split!r}: expected 'train' or 'eval'")
        if not data_cfg.eval and not holds_out:
            raise CtrscaleError(
                "no eval data: set data.eval, or data.holdout_fraction > 0 to hold out part of "
                "data.train"
            )
        return cls(
            data_cfg.eval or data_cfg.train,
            batch_size or data_cfg.eval_batch_size,
            shuffle=False,
            drop_last=False,
            split="holdout" if holds_out else None,
            **common,
        )

    # -- sizes -----------------------------------------------------------------------------

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    @property
    def files(self) -> list[str]:
        """The Parquet files, as local paths or URIs."""
        return [f.path for f in self._files]

    def id_counts(self, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Occurrences of every id in this split (rank r of N counts every N-th row group;
        sum over the ranks): C1's table first, then C2's, … (`count_ids`)."""
        return count_ids(
            self._files, self._row_groups, self._holdout.kept_mask, self.table_sizes, rank,
            world_size,
        )  # fmt: skip

    def has_column(self, name: str) -> bool:
        """Whether every file has the column (e.g. `p_true`, which only synthetic data has)."""
        return all(name in f.metadata.schema.names for f in self._files)

    @property
    def num_rows(self) -> int:
        """Rows of this split over all ranks (the holdout hash runs once, then is cached)."""
        return int(self._kept_row_counts().sum())

    def num_batches(self) -> int:
        """Batches per epoch, the same on every rank."""
        full, remainder = divmod(self.num_rows, self.batch_size)
        return full + (1 if remainder and not self.drop_last else 0)

    def rows_of(self, index: int, ranks: range) -> int:
        """Rows the `ranks` (of this loader's world) get of global batch `index` of an epoch —
        host arithmetic on the same slicing as `_batches`, so no collective is needed."""
        size = min(self.batch_size, self.num_rows - index * self.batch_size)
        return ranks.stop * size // self.world_size - ranks.start * size // self.world_size

    def __len__(self) -> int:
        return self.num_batches()

    # -- cursor ----------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Position the cursor at the start of `epoch`."""
        if epoch < 0:
            raise CtrscaleError(f"epoch={epoch}: must be >= 0")
        self._epoch, self._batches_done = epoch, 0

    @property
    def _shares(self) -> int:
        """Shares the epoch's stream is cut into: the world size when sharded, else 1."""
        return self.world_size if self.sharded_decode else 1

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._epoch,
            "batches_done": self._batches_done,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shares": self._shares,
        }

    def _check_mid_epoch_layout(self, state: dict[str, int], done: int, total: int) -> None:
        """The rows done mid-epoch are a prefix of the stream only when replicated; sharded,
        they are a prefix of each of N shares, which only the same N can continue."""
        shares = int(state.get("shares", 1))
        if 0 < done < total and shares != self._shares:
            raise CtrscaleError(
                f"the loader state stopped {done} batches into epoch {state['epoch']} with the "
                f"stream cut into {shares} share(s) (data.decode, world size), this loader cuts "
                f"it into {self._shares}: resume with the same number of processes and "
                "data.decode, or from a checkpoint at an epoch boundary"
            )

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a cursor; the seed comes with it so the order is the checkpointed one."""
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise CtrscaleError(
                f"the loader state was saved with batch_size={state['batch_size']}, this loader "
                f"has {self.batch_size}: the batches done would not mean the same rows"
            )
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if epoch < 0 or not 0 <= done <= self.num_batches():
            raise CtrscaleError(
                f"loader state epoch={epoch}, batches_done={done}: outside this dataset's "
                f"{self.num_batches()} batches per epoch"
            )
        self._check_mid_epoch_layout(state, done, self.num_batches())
        self.seed = int(state["seed"])
        self._epoch, self._batches_done = epoch, done

    def continue_from(self, state: dict[str, int]) -> None:
        """Position the cursor at the row where another loader's state stopped (same data and
        seed, any batch size that divides the rows it had read of its epoch)."""
        if int(state.get("shares", 1)) > 1 and int(state["batches_done"]) > 0:
            raise CtrscaleError(
                f"the checkpoint's loader stopped {state['batches_done']} batches into epoch "
                f"{state['epoch']} with the stream cut into {state['shares']} shares "
                "(data.decode='sharded'): the rows it read are not a prefix of the stream, so no "
                "other batch size can continue after them; run it with data.decode='replicated'"
            )
        rows = int(state["batches_done"]) * int(state["batch_size"])
        done, remainder = divmod(rows, self.batch_size)
        if remainder:
            raise CtrscaleError(
                f"the checkpoint's loader stopped after {rows:,} rows of epoch {state['epoch']}, "
                f"not a multiple of this run's global batch of {self.batch_size:,} rows "
                "(data.batch_size × data.shard_count): choose batch sizes that divide it"
            )
        self.load_state_dict({"epoch": state["epoch"], "batches_done": done, "seed": state["seed"]})

    # -- iteration -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        # The decode buffers are shared, so a new iteration ends the previous one.
        previous = self._active() if self._active is not None else None
        if previous is not None:
            previous.close()
        iteration = self._iterate(self._epoch, self._batches_done)
        # A weak reference, so that an abandoned iteration is still collected (and its thread
        # stopped) as soon as the caller drops it.
        self._active = weakref.ref(iteration)
        return iteration

    def _iterate(self, epoch: int, first: int) -> Generator[Batch, None, None]:
        batches = self._batches(epoch, first)
        if self.pin_memory:
            batches = _pinned(batches)
        if self.prefetch_batches:
            batches = prefetched(batches, self.prefetch_batches)
        try:
            for batch in batches:
                self._batches_done += 1
                yield batch
        finally:
            batches.close()
        self._epoch, self._batches_done = epoch + 1, 0

    def _batches(self, epoch: int, first: int) -> Iterator[Batch]:
        """This rank's slices of global batches `first`, `first + 1`, … of `epoch`."""
        order = EpochOrder(self.seed, epoch, self.shuffle, self.shuffle_buffer_rows)
        windows = order.windows(self._row_groups, self._kept_row_counts())
        reader = WindowReader(order, windows, self._decoder.decode, self._extra_dtypes)
        for index in range(first, self.num_batches()):
            lo, hi = self._stream_rows(index)
            yield reader.rows(lo, hi).to_batch(self._kjt_layout)

    def _stream_rows(self, index: int) -> tuple[int, int]:
        """The epoch-stream rows [lo, hi) this rank yields as its part of global batch `index`
        (the layouts of the module docstring)."""
        r, n, batch = self.rank, self.world_size, self.batch_size
        full, remainder = divmod(self.num_rows, batch)
        size = batch if index < full else remainder
        mine = size * (r + 1) // n - size * r // n
        if not self.sharded_decode:
            start = index * batch + size * r // n
            return start, start + mine
        served = 0 if self.drop_last else remainder  # the rows batches are cut from
        share_start = full * (batch * r // n) + served * r // n
        start = share_start + min(index, full) * (batch * (r + 1) // n - batch * r // n)
        return start, start + mine

    def _kept_row_counts(self) -> np.ndarray:
        """Rows this split keeps of each row group, hashed once and then cached."""
        if self._kept_counts is None:
            self._kept_counts = self._holdout.kept_counts(self._row_groups)
        return self._kept_counts


def _pinned(batches: Generator[Batch, None, None]) -> Generator[Batch, None, None]:
    """Page-locked copies, made where the batches are made (the prefetch thread), so the
    training thread's `.to(cuda, non_blocking=True)` returns at once and the copy overlaps the
    previous step; a copy also releases the shared decode buffers straight away."""
    try:
        for batch in batches:
            yield batch.pin_memory()
    finally:
        batches.close()
