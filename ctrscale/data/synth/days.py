"""Writing days: chunks → `DIR/day=N/` Parquet or raw Criteo TSV, and each day's truth.

Owns the on-disk layout of a synthetic dataset: `DIR/day=N/part-00000.parquet …`
(schema.PARQUET_SCHEMA + `p_true`) or raw Criteo TSV `DIR/day_N.tsv` with ids scrambled to
8 hex characters (decodable with `decode_hex_id`); `DIR/_truth/day=N.parquet`, the day's
p_true histogram (the `_` prefix keeps it out of Parquet dataset discovery), from which later
runs recompute the Bayes metrics of "all"; and those metrics. The histograms are exact and
bounded: p_true lives on a 2^-20 grid, so memory does not grow with the number of rows.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ctrscale import metrics
from ctrscale.data import schema
from ctrscale.data.synth.rows import CHUNK_ROWS
from ctrscale.data.synth.teacher import PROBABILITY_GRID, Chunk
from ctrscale.errors import CtrscaleError

ROW_GROUPS_PER_FILE = 8  # 1,048,576 rows ≈ 45 MB per part file: several files per large day
TRUTH_DIR = "_truth"
# TSV ids: (id · odd multiplier + per-feature salt) mod 2^32 is a bijection, so distinct
# synthetic ids stay distinct hex values and can be decoded again.
HEX_MULTIPLIER = 0x9E3779B1
_HEX_INVERSE = pow(HEX_MULTIPLIER, -1, 1 << 32)
_HEX_SALT_STEP = 0x85EBCA77

PARQUET_SCHEMA = schema.PARQUET_SCHEMA.append(
    pa.field(schema.TRUE_PROBABILITY, pa.float32(), nullable=False)
)


def hex_salt(feature: str) -> int:
    """The per-feature offset of the TSV id scramble, so equal ids differ across features."""
    return ((schema.SPARSE_FEATURES.index(feature) + 1) * _HEX_SALT_STEP) % (1 << 32)


def decode_hex_id(feature: str, hex_value: str) -> int:
    """The synthetic id (1 … values) behind a TSV hex field."""
    return ((int(hex_value, 16) - hex_salt(feature)) * _HEX_INVERSE) % (1 << 32)


def write_day(out: Path, day: int, fmt: str, chunks: Iterator[Chunk]) -> np.ndarray:
    """Write one day next to its final place, then move it there; returns its truth counts."""
    final = out / (f"day={day}" if fmt == "parquet" else f"day_{day}.tsv")
    partial = out / f".{final.name}.partial"
    _remove(partial)
    counts = empty_counts()

    def counted(chunk: Chunk) -> Chunk:
        # Flat indices hit np.add.at's fast path; counts is C-ordered (grid, label).
        np.add.at(counts.reshape(-1), 2 * chunk.p_grid + chunk.labels, 1)
        return chunk

    counted_chunks = map(counted, chunks)
    if fmt == "parquet":
        _write_parquet_day(partial, counted_chunks)
    else:
        _write_tsv_day(partial, counted_chunks)
    _remove(final)
    partial.rename(final)
    return counts


def _write_parquet_day(directory: Path, chunks: Iterator[Chunk]) -> None:
    directory.mkdir()
    writer: pq.ParquetWriter | None = None
    try:
        for index, chunk in enumerate(chunks):
            if index % ROW_GROUPS_PER_FILE == 0:
                if writer is not None:
                    writer.close()
                part = directory / f"part-{index // ROW_GROUPS_PER_FILE:05d}.parquet"
                writer = pq.ParquetWriter(part, PARQUET_SCHEMA)
            writer.write_table(_parquet_table(chunk), row_group_size=CHUNK_ROWS)
    finally:
        if writer is not None:
            writer.close()


def _parquet_table(chunk: Chunk) -> pa.Table:
    columns = [
        pa.array(chunk.labels),
        *(pa.array(column) for column in chunk.dense),
        *(pa.array(column) for column in chunk.ids),
        pa.array(chunk.p_true),
    ]
    return pa.Table.from_arrays(columns, schema=PARQUET_SCHEMA)


_TSV_OPTIONS = pa_csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _write_tsv_day(path: Path, chunks: Iterator[Chunk]) -> None:
    writer: pa_csv.CSVWriter | None = None
    try:
        for chunk in chunks:
            table = _tsv_table(chunk)
            if writer is None:
                writer = pa_csv.CSVWriter(path, table.schema, write_options=_TSV_OPTIONS)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def _tsv_table(chunk: Chunk) -> pa.Table:
    """Criteo's raw layout: label, counts (null → empty field), hex ids (null → empty)."""
    columns = [
        pa.array(chunk.labels),
        *(
            pa.array(counts, mask=missing)
            for counts, missing in zip(chunk.counts, chunk.dense_missing, strict=True)
        ),
        *(
            _hex_column(name, ids)
            for name, ids in zip(schema.SPARSE_FEATURES, chunk.ids, strict=True)
        ),
    ]
    return pa.Table.from_arrays(columns, names=list(schema.RAW_COLUMNS))


def _hex_column(feature: str, ids: np.ndarray) -> pa.Array:
    """8 lowercase hex chars of the scrambled id per row, null where the id is missing (0)."""
    scrambled = ids.astype(np.uint64) * np.uint64(HEX_MULTIPLIER) + np.uint64(hex_salt(feature))
    digits = (scrambled & np.uint64(0xFFFFFFFF)).astype(">u4").view(np.uint8).reshape(-1, 4)
    chars = np.empty((ids.size, 8), dtype=np.uint8)
    chars[:, 0::2] = _HEX_DIGITS[digits >> 4]
    chars[:, 1::2] = _HEX_DIGITS[digits & 15]
    offsets = np.arange(0, 8 * ids.size + 1, 8, dtype=np.int32)
    validity = np.packbits(ids != 0, bitorder="little")
    return pa.StringArray.from_buffers(
        ids.size, pa.py_buffer(offsets), pa.py_buffer(chars), pa.py_buffer(validity)
    )


def empty_counts() -> np.ndarray:
    """Rows per (p_true grid index, label): the exact sufficient statistic of Bayes metrics."""
    return np.zeros((PROBABILITY_GRID, 2), dtype=np.int64)


def _truth_path(out: Path, day: int) -> Path:
    return out / TRUTH_DIR / f"day={day}.parquet"


def write_truth(out: Path, day: int, counts: np.ndarray) -> None:
    present = np.flatnonzero(counts.sum(axis=1))
    table = pa.table(
        {
            schema.TRUE_PROBABILITY: pa.array((present / PROBABILITY_GRID).astype(np.float32)),
            "negatives": pa.array(counts[present, 0]),
            "positives": pa.array(counts[present, 1]),
        }
    )
    path = _truth_path(out, day)
    path.parent.mkdir(exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    pq.write_table(table, partial)
    partial.replace(path)


def read_truth(out: Path, day: int) -> np.ndarray:
    path = _truth_path(out, day)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise CtrscaleError(
            f"{path}: missing, so the 'all' Bayes metrics cannot be recomputed; regenerate "
            f"day {day} with --first-day {day} --days 1"
        ) from None
    counts = empty_counts()
    grid = np.rint(table[schema.TRUE_PROBABILITY].to_numpy() * PROBABILITY_GRID).astype(np.int64)
    counts[grid, 0] = table["negatives"].to_numpy()
    counts[grid, 1] = table["positives"].to_numpy()
    return counts


def split_metrics(counts: np.ndarray) -> dict[str, Any]:
    present = np.flatnonzero(counts.sum(axis=1))
    negatives, positives = counts[present, 0], counts[present, 1]
    p_true = present / PROBABILITY_GRID
    rows, clicks = int(counts.sum()), int(positives.sum())
    both_classes = 0 < clicks < rows
    return {
        "rows": rows,
        "positives": clicks,
        "ctr": clicks / rows,
        "mean_p_true": float(p_true @ (negatives + positives)) / rows,
        "bayes_auc": metrics.auc_from_counts(positives, negatives) if both_classes else None,
        "bayes_logloss": metrics.logloss_from_counts(p_true, positives, negatives),
    }


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
