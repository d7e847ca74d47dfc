"""The frequency-thresholded categorical vocabulary of `ctrscale prepare --ids vocab`.

Owns counting raw categorical values in a streaming pass, turning the counts into ids
(0 = missing, 1 = out-of-vocabulary, 2.. = values by count descending then value ascending),
the on-disk artifact `DIR/_vocab/C<k>.parquet` (columns value, id, count), and mapping values to
ids for every later day so that ids stay stable across days.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ctrscale.data.schema import SPARSE_FEATURES
from ctrscale.errors import CtrscaleError
from ctrscale.files import publish_dir

MISSING_ID = 0
OOV_ID = 1
FIRST_VALUE_ID = 2
VOCAB_DIR = "_vocab"  # underscore: dataset readers skip it, it is not training data

# Values are 32-bit (8 hex chars), so feature index and value pack into one int64 key and all
# 26 columns are counted with a single group-by instead of 26.
_KEY_STRIDE = 1 << 32
# Partial counts are merged once they outgrow the merged table, so merging stays amortised
# linear and memory stays proportional to the number of distinct values, not to the rows read.
_MIN_MERGE_ROWS = 4_000_000


class VocabCounter:
    """Streaming per-feature value counts over the valid rows of the fitting pass."""

    def __init__(self) -> None:
        self._merged = pl.DataFrame(schema={"key": pl.Int64, "count": pl.Int64})
        self._pending: list[pl.DataFrame] = []
        self._pending_rows = 0

    def update(self, sparse: pl.DataFrame) -> None:
        """Count one chunk; `sparse` holds C1..C26 as Int64 values, null where missing."""
        keys = pl.concat(
            [
                sparse.select((pl.col(name) + index * _KEY_STRIDE).alias("key"))
                for index, name in enumerate(SPARSE_FEATURES)
            ]
        ).drop_nulls()
        counts = keys.group_by("key").agg(pl.len().cast(pl.Int64).alias("count"))
        self._pending.append(counts)
        self._pending_rows += counts.height
        if self._pending_rows > max(self._merged.height, _MIN_MERGE_ROWS):
            self._merge()

    def _merge(self) -> None:
        self._merged = (
            pl.concat([self._merged, *self._pending]).group_by("key").agg(pl.col("count").sum())
        )
        self._pending, self._pending_rows = [], 0

    def build(self, min_count: int) -> Vocabulary:
        """Ids for every value seen at least `min_count` times; rarer values become OOV."""
        self._merge()
        kept = self._merged.filter(pl.col("count") >= min_count).select(
            (pl.col("key") // _KEY_STRIDE).alias("feature"),
            (pl.col("key") % _KEY_STRIDE).alias("value"),
            pl.col("count"),
        )
        tables = {}
        for index, name in enumerate(SPARSE_FEATURES):
            table = (
                kept.filter(pl.col("feature") == index)
                .sort(["count", "value"], descending=[True, False])
                .select(
                    "value",
                    (pl.int_range(pl.len(), dtype=pl.Int64) + FIRST_VALUE_ID).alias("id"),
                    "count",
                )
            )
            tables[name] = table
        return Vocabulary(tables)


@dataclass
class Vocabulary:
    """Per-feature `value → id` tables (value as the 32-bit integer the hex string encodes)."""

    tables: dict[str, pl.DataFrame]

    def __post_init__(self) -> None:
        # Sorted values with their ids make each lookup a binary search: no per-chunk hash
        # table over a vocabulary that may hold millions of values.
        self._sorted: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, table in self.tables.items():
            by_value = table.sort("value")
            self._sorted[name] = (by_value["value"].to_numpy(), by_value["id"].to_numpy())

    def table_sizes(self) -> dict[str, int]:
        """Embedding rows per feature: the kept values plus the missing and OOV ids."""
        return {name: self.tables[name].height + FIRST_VALUE_ID for name in SPARSE_FEATURES}

    def lookup(self, name: str, values: pl.Series) -> pl.Series:
        """Ids of `values` (Int64, null = missing): 0 for missing, 1 for values not kept."""
        known_values, known_ids = self._sorted[name]
        raw = values.fill_null(-1).to_numpy()
        ids = np.full(raw.shape, OOV_ID, dtype=np.int64)
        if known_values.size:
            position = np.minimum(np.searchsorted(known_values, raw), known_values.size - 1)
            found = known_values[position] == raw
            ids[found] = known_ids[position[found]]
        ids[raw < 0] = MISSING_ID
        return pl.Series(name, ids)

    def save(self, dataset_dir: Path) -> None:
        """Write `dataset_dir/_vocab/` atomically (a temp dir renamed into place)."""
        final = dataset_dir / VOCAB_DIR
        tmp = dataset_dir / f".tmp-{VOCAB_DIR}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for name, table in self.tables.items():
                readable = table.select(
                    pl.col("value").map_batches(_to_hex, return_dtype=pl.String),
                    "id",
                    "count",
                )
                pq.write_table(readable.to_arrow(), tmp / f"{name}.parquet")
            publish_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, dataset_dir: Path) -> Vocabulary:
        """The vocabulary a first `prepare --ids vocab` saved in `dataset_dir/_vocab/`."""
        tables = {}
        for name in SPARSE_FEATURES:
            path = dataset_dir / VOCAB_DIR / f"{name}.parquet"
            if not path.exists():
                raise CtrscaleError(
                    f"{path}: missing; metadata.json says ids are 'vocab' but the vocabulary "
                    "artifact is incomplete — re-create the dataset"
                )
            tables[name] = pl.read_parquet(path).select(
                pl.col("value").str.to_integer(base=16),
                pl.col("id").cast(pl.Int64),
                pl.col("count").cast(pl.Int64),
            )
        return cls(tables)


def _to_hex(values: pl.Series) -> pl.Series:
    """32-bit values as the 8 lowercase hex characters they came from in the raw data."""
    as_text = pa.array(np.char.mod("%08x", values.to_numpy()).astype(object), pa.string())
    return pl.Series(values.name, as_text)
