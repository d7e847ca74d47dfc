"""Shuffling: the seeded order of an epoch and the bounded buffer it is served from.

Owns the random streams of (seed, epoch), the windows — consecutive row groups, in permuted
order, of about `shuffle_buffer_rows` rows — whose kept rows are shuffled together, each
window's permutation, and `WindowReader`, which serves increasing ranges of the epoch's row
stream while holding one decoded window at a time. That one window is what bounds memory,
and because windows are planned from row counts alone, a cursor is resumed by decoding only
the window that contains it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ctrscale.data.loader.batches import BatchArrays, Rows
from ctrscale.data.loader.dataset import RowGroup
from ctrscale.data.loader.holdout import UINT64_MASK

_ROW_GROUP_ORDER, _WINDOW_ORDER = 0, 1  # separate random streams per (seed, epoch)


@dataclass(frozen=True)
class Window:
    """Row groups whose kept rows are shuffled together; `start` is its first stream row."""

    row_groups: tuple[int, ...]
    start: int
    rows: int


@dataclass(frozen=True)
class EpochOrder:
    """The read order of one epoch: a pure function of (seed, epoch) and the row counts."""

    seed: int
    epoch: int
    shuffle: bool
    buffer_rows: int

    def _rng(self, stream: int, *index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & UINT64_MASK, self.epoch, stream, *index])

    def windows(self, row_groups: list[RowGroup], kept: np.ndarray) -> list[Window]:
        """The epoch's row groups in read order, cut into shuffle windows.

        `kept` is the number of rows the split keeps of each row group.
        """
        order = np.arange(len(row_groups))
        if self.shuffle:
            order = self._rng(_ROW_GROUP_ORDER).permutation(len(row_groups))
        # Without shuffling a window is one row group: nothing to mix, least memory.
        limit = self.buffer_rows if self.shuffle else 1
        windows: list[Window] = []
        members: list[int] = []
        raw_rows = start = kept_rows = 0
        for group in order.tolist():
            size = row_groups[group].num_rows
            if members and raw_rows + size > limit:
                windows.append(Window(tuple(members), start, kept_rows))
                start += kept_rows
                members, raw_rows, kept_rows = [], 0, 0
            members.append(group)
            raw_rows += size
            kept_rows += int(kept[group])
        if members:
            windows.append(Window(tuple(members), start, kept_rows))
        return windows

    def window_order(self, window_index: int, rows: int) -> np.ndarray | None:
        """The permutation of a window's rows; None (stream order) without shuffling."""
        if not self.shuffle:
            return None
        return self._rng(_WINDOW_ORDER, window_index).permutation(rows)


class WindowReader:
    """Serves increasing stream ranges of one epoch, decoding only the windows they touch.

    One window is decoded at a time, by `decode` into buffers sized for the epoch's largest
    window and reused, which is what bounds the loader's memory.
    """

    def __init__(
        self,
        order: EpochOrder,
        windows: list[Window],
        decode: Callable[[Window], Rows],
        extra_dtypes: dict[str, np.dtype],
    ) -> None:
        self._epoch_order = order
        self._windows = windows
        self._decode = decode
        self._extra_dtypes = extra_dtypes
        self._starts = [w.start for w in windows]
        self._loaded: int | None = None
        self._rows = Rows.allocate(0, extra_dtypes)
        self._order: np.ndarray | None = None

    def rows(self, lo: int, hi: int) -> BatchArrays:
        out = BatchArrays.allocate(hi - lo, self._extra_dtypes)
        position = lo
        while position < hi:
            # bisect_right skips empty windows, which share their start with the next one.
            index = bisect.bisect_right(self._starts, position) - 1
            window = self._load(index)
            end = min(hi, window.start + window.rows)
            a, b = position - window.start, end - window.start
            selection = slice(a, b) if self._order is None else self._order[a:b]
            self._rows.copy_to(selection, out, position - lo)
            position = end
        return out

    def _load(self, index: int) -> Window:
        window = self._windows[index]
        if self._loaded != index:
            self._rows = self._decode(window)
            self._order = self._epoch_order.window_order(index, window.rows)
            self._loaded = index
        return window
