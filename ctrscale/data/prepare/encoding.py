"""Encoding: how valid rows become model inputs, fitted once per dataset and then reused.

Owns the dense transform (log1p, or min-max with bounds fitted on the first run's inputs), the
categorical ids (hashing into `table_size - 1` buckets, or a frequency-thresholded vocabulary,
see `vocab.py`), the flags that request them, fitting a new dataset's encoding in a first pass
and recovering an existing dataset's from its metadata.json, so that later days get the same
ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from ctrscale.choices import DenseTransform, IdEncoding, names
from ctrscale.data import schema
from ctrscale.data.prepare.parse import InputStats, check_rejects, scan
from ctrscale.data.prepare.vocab import VOCAB_DIR, VocabCounter, Vocabulary
from ctrscale.data.schema import DENSE_FEATURES, LABEL, SPARSE_FEATURES
from ctrscale.errors import CtrscaleError

DEFAULT_MIN_COUNT = 4
MAX_HASH_TABLE_SIZE = 10_000_000
# Small fields get 100× their cardinality in buckets (up to SMALL_TABLE_ROWS), so that about
# 1% of their values share a bucket (1 − e^(−n/m)) instead of 63% at m = n: on the 100 real
# Criteo rows 3.3% of distinct values collided at m = cardinality and none do now, for 2.5%
# more table rows in all (docs/hash-collisions.md).
HASH_HEADROOM = 100
SMALL_TABLE_ROWS = 100_000

Progress = Callable[[str], None]


@dataclass
class Encoding:
    """How valid rows become model inputs; stored in metadata.json and reused by later days."""

    dense_transform: str
    ids: str
    table_sizes: dict[str, int]
    dense_minmax: dict[str, list[int]] | None = None
    min_count: int | None = None
    vocabulary: Vocabulary | None = None

    def _dense(self, name: str) -> pl.Expr:
        raw = pl.col(name).fill_null(0)
        if self.dense_transform == DenseTransform.LOG1P:
            value = raw.clip(lower_bound=0).cast(pl.Float64).log1p()
        else:
            low, high = self.dense_minmax[name]
            # A constant column maps to 0 (scikit-learn's MinMaxScaler does the same).
            value = ((raw - low) / max(high - low, 1)).clip(0.0, 1.0)
        return value.cast(pl.Float32).alias(name)

    def _hashed(self, name: str) -> pl.Expr:
        buckets = self.table_sizes[name] - 1  # id 0 is reserved for missing
        return (pl.col(name) % buckets + 1).fill_null(0).alias(name)

    def encode(self, valid: pl.DataFrame) -> pa.Table:
        """The rows in `schema.PARQUET_SCHEMA`."""
        dense = [self._dense(name) for name in DENSE_FEATURES]
        if self.vocabulary is None:
            out = valid.select(LABEL, *dense, *[self._hashed(name) for name in SPARSE_FEATURES])
        else:
            out = valid.select(LABEL, *dense, *SPARSE_FEATURES).with_columns(
                self.vocabulary.lookup(name, valid[name]) for name in SPARSE_FEATURES
            )
        table = out.to_arrow()
        return pa.Table.from_arrays(table.columns, schema=schema.PARQUET_SCHEMA)

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "version": schema.METADATA_VERSION,
            "table_sizes": self.table_sizes,
            "dense_transform": self.dense_transform,
            "ids": self.ids,
            "min_count": self.min_count,
        }
        if self.dense_minmax is not None:
            meta["dense_minmax"] = self.dense_minmax
        if self.vocabulary is not None:
            meta["vocab_dir"] = VOCAB_DIR
        return meta


@dataclass(frozen=True)
class Requested:
    """The encoding flags as given; None means 'not given'."""

    dense_transform: str | None
    ids: str | None
    table_size: int | None
    min_count: int | None


def _hash_table_sizes(table_size: int | None) -> dict[str, int]:
    if table_size is not None:
        return dict.fromkeys(SPARSE_FEATURES, table_size)
    return {
        name: default_hash_buckets(cardinality) + 1
        for name, cardinality in schema.CRITEO_KAGGLE_CARDINALITIES.items()
    }


def default_hash_buckets(cardinality: int) -> int:
    """Buckets of a field with `cardinality` distinct values (id 0, missing, comes on top)."""
    roomy = min(HASH_HEADROOM * cardinality, SMALL_TABLE_ROWS)
    return min(max(cardinality, roomy), MAX_HASH_TABLE_SIZE)


def validate_request(requested: Requested) -> None:
    if requested.dense_transform not in (None, *DenseTransform):
        raise CtrscaleError(
            f"dense_transform must be one of {names(DenseTransform)}, not "
            f"{requested.dense_transform!r}"
        )
    if requested.ids not in (None, *IdEncoding):
        raise CtrscaleError(f"ids must be one of {names(IdEncoding)}, not {requested.ids!r}")
    if requested.table_size is not None and requested.table_size < 2:
        raise CtrscaleError("--table-size must be at least 2 (id 0 is reserved for missing)")
    if requested.min_count is not None and requested.min_count < 1:
        raise CtrscaleError("--min-count must be at least 1")


def stored_encoding(out_dir: Path, meta: dict[str, Any], requested: Requested) -> Encoding:
    """The dataset's own encoding; explicit flags that contradict it are an error."""
    path = out_dir / schema.METADATA_FILE
    if meta.get("ids") not in tuple(IdEncoding) or meta.get("dense_transform") not in tuple(
        DenseTransform
    ):
        raise CtrscaleError(f"{path}: not written by `ctrscale prepare` (no ids/dense_transform)")
    conflicts = []
    if requested.dense_transform not in (None, meta["dense_transform"]):
        conflicts.append(f"--dense-transform {requested.dense_transform}")
    if requested.ids not in (None, meta["ids"]):
        conflicts.append(f"--ids {requested.ids}")
    stored_sizes = set(meta["table_sizes"].values())
    if requested.table_size is not None and (
        meta["ids"] != IdEncoding.HASH or stored_sizes != {requested.table_size}
    ):
        conflicts.append(f"--table-size {requested.table_size}")
    if requested.min_count not in (None, meta.get("min_count")):
        conflicts.append(f"--min-count {requested.min_count}")
    if conflicts:
        stored = (
            f"dense_transform={meta['dense_transform']}, ids={meta['ids']}, "
            f"min_count={meta.get('min_count')}"
        )
        raise CtrscaleError(
            f"{', '.join(conflicts)} contradicts the existing dataset {out_dir} ({stored}); "
            "later days must reuse its encoding so ids stay stable — drop the flag or use a "
            "new --out"
        )
    return Encoding(
        dense_transform=meta["dense_transform"],
        ids=meta["ids"],
        table_sizes={name: int(size) for name, size in meta["table_sizes"].items()},
        dense_minmax=meta.get("dense_minmax"),
        min_count=meta.get("min_count"),
        vocabulary=Vocabulary.load(out_dir) if meta["ids"] == IdEncoding.VOCAB else None,
    )


def fit_encoding(
    requested: Requested,
    jobs: list[tuple[Path, int]],
    out_dir: Path,
    max_reject_fraction: float,
    progress: Progress,
    short_lines: bool = False,
) -> Encoding:
    """A new dataset's encoding; min-max and vocabulary need one pass over all inputs."""
    dense_transform = requested.dense_transform or DenseTransform.LOG1P
    ids = requested.ids or IdEncoding.HASH
    if ids == IdEncoding.VOCAB and requested.table_size is not None:
        raise CtrscaleError("--table-size applies to --ids hash; a vocabulary sizes itself")
    if ids == IdEncoding.HASH and requested.min_count is not None:
        raise CtrscaleError("--min-count applies to --ids vocab only")
    if dense_transform == DenseTransform.LOG1P and ids == IdEncoding.HASH:
        return Encoding(dense_transform, ids, _hash_table_sizes(requested.table_size))

    progress(f"fitting {dense_transform} / {ids} on {len(jobs)} input(s) (first pass)")
    dense_range = DenseRange() if dense_transform == DenseTransform.MINMAX else None
    counter = VocabCounter() if ids == IdEncoding.VOCAB else None
    for source, day in jobs:
        stats = InputStats(source, day, short_lines, progress)
        for parsed in scan(stats):
            if counter is not None:
                counter.update(parsed.valid.select(SPARSE_FEATURES))
            if dense_range is not None:
                dense_range.update(parsed.valid)
        check_rejects(stats, max_reject_fraction, out_dir)

    encoding = Encoding(dense_transform, ids, _hash_table_sizes(requested.table_size))
    if dense_range is not None:
        encoding.dense_minmax = dense_range.bounds()
    if counter is not None:
        encoding.min_count = requested.min_count or DEFAULT_MIN_COUNT
        encoding.vocabulary = counter.build(encoding.min_count)
        encoding.table_sizes = encoding.vocabulary.table_sizes()
    return encoding


class DenseRange:
    """Running min/max of the raw dense values; missing counts as 0, as in the transform."""

    def __init__(self) -> None:
        self.low: dict[str, int] = {}
        self.high: dict[str, int] = {}

    def update(self, valid: pl.DataFrame) -> None:
        if not valid.height:
            return
        filled = valid.select(pl.col(name).fill_null(0) for name in DENSE_FEATURES)
        for name, low, high in zip(
            DENSE_FEATURES, filled.min().row(0), filled.max().row(0), strict=True
        ):
            self.low[name] = min(self.low.get(name, low), low)
            self.high[name] = max(self.high.get(name, high), high)

    def bounds(self) -> dict[str, list[int]]:
        return {name: [self.low.get(name, 0), self.high.get(name, 0)] for name in DENSE_FEATURES}
