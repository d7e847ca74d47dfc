"""The deterministic train/holdout split: which rows of each row group a split keeps.

Owns the splitmix64 row hash, the per-file keys it is seeded with and the split's row masks.
A row's side depends only on its file's stable id (the path below the dataset root), its
index in the file and the holdout seed — not on world size, batch size, shuffling or how the
paths were spelled — so train and holdout are disjoint, cover every row, and stay put.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np

from ctrscale.data.loader.dataset import ParquetFile, RowGroup

Split = Literal["train", "holdout"]

UINT64_MASK = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic), in place."""
    x += np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _file_hash_key(file_id: str, seed: int) -> int:
    """A 64-bit key of (file id, seed): blake2b, because Python's `hash` varies per process."""
    digest = int.from_bytes(hashlib.blake2b(file_id.encode(), digest_size=8).digest(), "little")
    seed_mix = _splitmix64(np.array([seed & UINT64_MASK], dtype=np.uint64))[0]
    return int(_splitmix64(np.array([digest ^ int(seed_mix)], dtype=np.uint64))[0])


def holdout_mask(file_key: int, first_row: int, num_rows: int, fraction: float) -> np.ndarray:
    """True for the held-out rows among rows [first_row, first_row + num_rows) of a file.

    A row is held out iff splitmix64(file key + row index) < fraction · 2^64, so the split
    depends only on the file's stable id, the row's index in the file and the seed.
    """
    threshold = np.uint64(min(int(fraction * 2.0**64), UINT64_MASK))
    rows = np.arange(first_row, first_row + num_rows, dtype=np.uint64)
    rows += np.uint64(file_key)
    return _splitmix64(rows) < threshold


class HoldoutSplit:
    """The rows one split (`"train"`, `"holdout"`, or None for all rows) keeps of each row group."""

    def __init__(
        self, files: list[ParquetFile], split: Split | None, fraction: float, seed: int
    ) -> None:
        self.split = split
        self.fraction = fraction
        self._file_keys = [_file_hash_key(f.file_id, seed) for f in files]

    def kept_mask(self, group: RowGroup) -> np.ndarray | None:
        """Which rows of the row group this split uses; None for all of them."""
        if self.split is None:
            return None
        key = self._file_keys[group.file]
        held_out = holdout_mask(key, group.first_row, group.num_rows, self.fraction)
        return held_out if self.split == "holdout" else ~held_out

    def kept_counts(self, groups: list[RowGroup]) -> np.ndarray:
        """Rows kept per row group (this hashes every row: callers cache it)."""
        return np.array(
            [
                g.num_rows if (kept := self.kept_mask(g)) is None else int(kept.sum())
                for g in groups
            ],
            dtype=np.int64,
        )
