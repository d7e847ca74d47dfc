"""How often each id occurs in a split: the counts that bucket evaluation rows by their
rarest id. Reads only the categorical columns, row group by row group, with the split's
holdout mask; several ranks share the row groups (rank r takes groups r, r+N, …) and sum
their counts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ctrscale.data.loader.batches import SPARSE_KEYS
from ctrscale.data.loader.dataset import ParquetFile, RowGroup
from ctrscale.data.loader.decode import read_table
from ctrscale.errors import DataError


def count_ids(
    files: list[ParquetFile],
    groups: list[RowGroup],
    kept_mask: Callable[[RowGroup], np.ndarray | None],
    table_sizes: dict[str, int],
    rank: int = 0,
    world_size: int = 1,
) -> np.ndarray:
    """Occurrences of every id of every feature in this rank's share of the row groups, as
    one int64 array: feature C1's table first, then C2's, … (`table_sizes` order)."""
    offsets = np.cumsum([0, *(table_sizes[k] for k in SPARSE_KEYS)])
    counts = np.zeros(offsets[-1], dtype=np.int64)
    for group in groups[rank::world_size]:
        file = files[group.file]
        where = f"{file.path}, row group {group.index}"
        table = read_table(file, group, list(SPARSE_KEYS), where)
        kept = kept_mask(group)
        for offset, key in zip(offsets[:-1], SPARSE_KEYS, strict=True):
            ids = table.column(key).to_numpy()
            if kept is not None:
                ids = ids[kept]
            if ids.size and not 0 <= ids.min() <= ids.max() < table_sizes[key]:
                raise DataError(f"{where}, column {key!r}: ids must lie in [0, {table_sizes[key]})")
            counts[offset : offset + table_sizes[key]] += np.bincount(
                ids, minlength=table_sizes[key]
            )
    return counts
