"""The loader's checks: its arguments, each file's schema, and the values of each row group.

Schema checks run when the loader is built and read only footers. Value checks run per row
group as it is decoded and cost a vectorized min/max per array; only once one has failed does
the slow search for the offending row run, so that every `DataError` names the file, row
group, column, value and row. Table sizes are validated by `schema.validate_table_sizes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctrscale.data import schema
from ctrscale.errors import CtrscaleError, DataError


def check_arguments(
    batch_size: int,
    rank: int,
    world_size: int,
    shuffle_buffer_rows: int,
    prefetch_batches: int,
    split: str | None,
    holdout_fraction: float,
) -> None:
    if batch_size <= 0 or world_size <= 0 or shuffle_buffer_rows <= 0 or prefetch_batches < 0:
        raise CtrscaleError(
            f"batch_size={batch_size}, world_size={world_size}, shuffle_buffer_rows="
            f"{shuffle_buffer_rows} must be positive and prefetch_batches={prefetch_batches} >= 0"
        )
    if batch_size % world_size:
        raise CtrscaleError(
            f"batch_size={batch_size} is not divisible by world_size={world_size}: every rank "
            "takes the same share batch_size / world_size of each global batch"
        )
    if not 0 <= rank < world_size:
        raise CtrscaleError(f"rank={rank} is outside [0, world_size={world_size})")
    if split not in (None, "train", "holdout"):
        raise CtrscaleError(f"split={split!r}: expected None, 'train' or 'holdout'")
    if not 0.0 <= holdout_fraction <= 1.0:
        raise CtrscaleError(f"holdout_fraction={holdout_fraction}: must be in [0, 1]")


def check_file_schema(path: Path, metadata: pq.FileMetaData, extras: Sequence[str]) -> None:
    try:
        arrow_schema = metadata.schema.to_arrow_schema()
    except pa.ArrowException as exc:
        raise DataError(f"{path}: cannot read the Parquet schema ({exc})") from None
    where = f"{path}, all {metadata.num_row_groups} row groups"
    for expected in schema.PARQUET_SCHEMA:
        if expected.name not in arrow_schema.names:
            raise DataError(f"{where}: column {expected.name!r} is missing")
        actual = arrow_schema.field(expected.name).type
        if actual != expected.type:
            raise DataError(
                f"{where}: column {expected.name!r} has type {actual}, expected {expected.type} "
                "(schema.PARQUET_SCHEMA)"
            )
    for name in extras:
        if name not in arrow_schema.names:
            raise DataError(f"{where}: extra column {name!r} is missing")
        extra_type = arrow_schema.field(name).type
        if not (pa.types.is_integer(extra_type) or pa.types.is_floating(extra_type)):
            raise DataError(f"{where}: extra column {name!r} has non-numeric type {extra_type}")


def _first_bad(bad: np.ndarray, kept: np.ndarray | None) -> tuple[int, int]:
    """(position among the kept rows, row within the row group) of the first True in `bad`."""
    position = int(np.flatnonzero(bad)[0])
    return position, position if kept is None else int(np.flatnonzero(kept)[position])


class Validator:
    """Cheap per-row-group value checks: vectorized min/max, one pass per array.

    The slow search for the offending row runs only once a check has failed.
    """

    def __init__(self, table_sizes: dict[str, int]) -> None:
        self._sizes = np.array([table_sizes[k] for k in schema.SPARSE_FEATURES], dtype=np.int64)

    def check_labels(self, labels: np.ndarray, where: str, kept: np.ndarray | None) -> None:
        if not len(labels) or (labels.min() >= 0 and labels.max() <= 1):
            return
        position, row = _first_bad((labels != 0) & (labels != 1), kept)
        raise DataError(
            f"{where}, column {schema.LABEL!r}: label {labels[position]} at row {row} is not 0 or 1"
        )

    def check_dense(self, dense: np.ndarray, where: str, kept: np.ndarray | None) -> None:
        finite = np.isfinite(dense)
        if finite.all():
            return
        column = int(np.flatnonzero(~finite.all(axis=0))[0])
        position, row = _first_bad(~finite[:, column], kept)
        raise DataError(
            f"{where}, column {schema.DENSE_FEATURES[column]!r}: value {dense[position, column]}"
            f" at row {row} is not finite"
        )

    def check_ids(self, ids: np.ndarray, where: str, kept: np.ndarray | None) -> None:
        """`ids` is feature-major (26, n)."""
        if not ids.shape[1]:
            return
        out_of_range = (ids.min(axis=1) < 0) | (ids.max(axis=1) >= self._sizes)
        if not out_of_range.any():
            return
        column = int(np.flatnonzero(out_of_range)[0])
        values, size = ids[column], self._sizes[column]
        position, row = _first_bad((values < 0) | (values >= size), kept)
        raise DataError(
            f"{where}, column {schema.SPARSE_FEATURES[column]!r}: id {values[position]} at row "
            f"{row} is outside [0, {size}) (the table size in metadata.json)"
        )
