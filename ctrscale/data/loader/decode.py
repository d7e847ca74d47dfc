"""Decoding: a window's row groups → the split's rows, validated, in one reused buffer.

Owns reading row groups with pyarrow, dropping the rows the split does not keep, the value
checks, and the layout change from Arrow's columns to the row-major window buffer. The buffer
(and the ids staging block) outlive windows and epochs: first-touching fresh pages of a
multi-100 MB array costs about as much as decoding into it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctrscale.data import schema
from ctrscale.data.loader.batches import NUM_SPARSE, Rows, transpose_into
from ctrscale.data.loader.dataset import ParquetFile, RowGroup
from ctrscale.data.loader.shuffle import Window
from ctrscale.data.loader.validation import Validator
from ctrscale.errors import DataError


def read_table(file: ParquetFile, group: RowGroup, columns: list[str], where: str) -> pa.Table:
    try:
        source = file.source
        handle = pq.ParquetFile(
            str(source.path), metadata=file.metadata, filesystem=source.filesystem
        )
        return handle.read_row_group(group.index, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{where}: cannot be read ({exc})") from None


def _column_numpy(table: pa.Table, name: str, where: str) -> np.ndarray:
    column = table.column(name)
    if column.null_count:
        raise DataError(f"{where}, column {name!r}: {column.null_count} null values")
    if column.num_chunks == 1:
        return column.chunk(0).to_numpy()  # zero-copy for primitive columns without nulls
    return column.to_numpy()


class WindowDecoder:
    """Decodes windows, one at a time, into a row-major buffer shared by all of them."""

    def __init__(
        self,
        files: list[ParquetFile],
        row_groups: list[RowGroup],
        extra_dtypes: dict[str, np.dtype],
        validator: Validator,
        kept_mask: Callable[[RowGroup], np.ndarray | None],
    ) -> None:
        self._files = files
        self._row_groups = row_groups
        self._extra_dtypes = extra_dtypes
        self._columns = list(dict.fromkeys([*schema.RAW_COLUMNS, *extra_dtypes]))
        self._validator = validator
        self._kept_mask = kept_mask
        self._window_buffer = Rows.allocate(0, extra_dtypes)
        largest_group = max((g.num_rows for g in row_groups), default=0)
        self._ids_stage = np.empty((NUM_SPARSE, largest_group), dtype=np.int64)

    def decode(self, window: Window) -> Rows:
        """The window's kept rows in read order: a view of the shared buffer, valid until the
        next call."""
        if len(self._window_buffer.labels) < window.rows:
            self._window_buffer = Rows.allocate(0, self._extra_dtypes)  # free before growing
            self._window_buffer = Rows.allocate(window.rows, self._extra_dtypes)
        out = self._window_buffer.head(window.rows)
        offset = 0
        for group in window.row_groups:
            offset = self._read_row_group_into(self._row_groups[group], out, offset)
        return out

    def _read_row_group_into(self, group: RowGroup, out: Rows, offset: int) -> int:
        """Decode, filter and validate one row group into `out` at `offset`; the new offset.

        Ids go through the staging block (26, rows): Arrow hands over whole columns, which land
        there with plain copies, are validated with one reduction per column, and are then
        transposed blockwise into the row-major window.
        """
        file = self._files[group.file]
        where = f"{file.path}, row group {group.index}"
        table = read_table(file, group, self._columns, where)
        kept = self._kept_mask(group)

        def column(name: str) -> np.ndarray:
            values = _column_numpy(table, name, where)
            return values if kept is None else values[kept]

        num_kept = group.num_rows if kept is None else int(np.count_nonzero(kept))
        target = slice(offset, offset + num_kept)
        labels = column(schema.LABEL)
        self._validator.check_labels(labels, where, kept)
        out.labels[target] = labels
        for j, name in enumerate(schema.DENSE_FEATURES):
            out.dense[target, j] = column(name)
        self._validator.check_dense(out.dense[target], where, kept)
        ids = self._ids_stage[:, :num_kept]
        for j, name in enumerate(schema.SPARSE_FEATURES):
            ids[j] = column(name)
        self._validator.check_ids(ids, where, kept)
        transpose_into(ids, out.sparse[target])
        for name in self._extra_dtypes:
            out.extras[name][target] = column(name)
        return offset + num_kept
