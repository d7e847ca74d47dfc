"""`ctrscale prepare`: raw Criteo TSV (plain or .gz) → day-partitioned Parquet.

Owns the whole conversion: reading raw lines in bounded chunks, validating and rejecting bad
rows (counted per reason, the first ones written to `DIR/rejects/day=N.tsv`), the dense
transform (log1p or a stored min-max fit), categorical ids (hashing or a stored vocabulary,
see `vocab.py`), publishing each `DIR/day=N/` atomically with its `_manifest.json`, and the
dataset's `metadata.json` and `summary.json`.

Why chunks of whole lines fed to polars instead of `pl.scan_csv`: one code path for plain and
gzip input (polars decompresses a .gz fully into memory), exact 1-based line numbers for
rejects, and ragged or corrupt lines handled by polars string ops instead of aborting the
reader. Peak memory is a few chunks, independent of the input size.
"""

from __future__ import annotations

import argparse
import gzip
import re
import shutil
import sys
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ctrscale.data import schema
from ctrscale.data.schema import DENSE_FEATURES, LABEL, SPARSE_FEATURES, sha256_file
from ctrscale.data.vocab import VOCAB_DIR, VocabCounter, Vocabulary
from ctrscale.errors import CtrscaleError, DataError
from ctrscale.files import publish_dir, write_json_atomic, write_text_atomic
from ctrscale.locking import ExclusiveLock

DEFAULT_ROW_GROUP_ROWS = 131_072
DEFAULT_MAX_REJECT_FRACTION = 0.001
DEFAULT_MIN_COUNT = 4
MAX_HASH_TABLE_SIZE = 10_000_000
ROW_GROUPS_PER_FILE = 16
CHUNK_BYTES = 8 << 20  # ~35k Criteo lines; larger chunks cost memory, not CPU
MAX_LINE_BYTES = 1 << 20
MAX_LOGGED_REJECTS = 1000

SUMMARY_FILE = "summary.json"
MANIFEST_FILE = "_manifest.json"
REJECTS_DIR = "rejects"
LOCK_FILE = ".prepare.lock"
TMP_PREFIX = ".tmp-"

REJECT_REASONS = (
    "empty_line",
    "too_many_fields",
    "bad_label",
    "bad_integer",
    "bad_categorical",
)

_FIELD_COUNT = "_fields"
_LINE_NO = "_line"
_RAW = "_raw"
_HEX8 = r"^[0-9a-fA-F]{8}$"
_DAY_NAME = re.compile(r"^day_(\d+)(\.[A-Za-z0-9]+)*$")
# \x01 is the separator that makes polars read each line as one field, and polars refuses
# invalid UTF-8; such bytes can only sit in an invalid field, so '?' keeps the row rejected
# for the same reason and keeps it on its own line.
_UNSAFE_BYTES = bytes.maketrans(bytes([1, *range(128, 256)]), b"?" * 129)

_NO_REJECTS = pl.DataFrame(
    schema={_LINE_NO: pl.Int64, "reason": pl.String, "column": pl.String, "value": pl.String}
)

T = TypeVar("T")
Progress = Callable[[str], None]


# --- reading ------------------------------------------------------------------------------


def _open_raw(path: Path) -> BinaryIO:
    """The file's decompressed bytes; gzip is recognised by its magic number, not its name."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    # Decompressing ourselves, chunk by chunk, keeps memory bounded; polars would inflate the
    # whole .gz into memory before parsing it.
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _line_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    """Blocks of about `chunk_bytes` holding whole lines; the last may lack its newline."""
    carry = b""
    consumed = 0
    try:
        with _open_raw(path) as raw:
            while block := raw.read(chunk_bytes):
                cut = block.rfind(b"\n") + 1
                if cut == 0:
                    carry += block
                    if len(carry) > MAX_LINE_BYTES:
                        raise DataError(
                            f"{path}: a line starting at byte {consumed} is longer than "
                            f"{MAX_LINE_BYTES} bytes; this is not Criteo TSV"
                        )
                    continue
                chunk = b"".join((carry, memoryview(block)[:cut]))
                consumed += len(chunk)
                yield chunk
                carry = block[cut:]
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip input ({exc})") from None
    if carry:
        yield carry


def _prefetched(items: Generator[T, None, None]) -> Iterator[T]:
    """`items`, produced one ahead in a background thread (decompression overlaps parsing)."""
    end = object()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            upcoming = pool.submit(next, items, end)
            while (item := upcoming.result()) is not end:
                upcoming = pool.submit(next, items, end)
                yield item
    finally:
        items.close()  # only after the pool is shut down: the generator is idle by then


# --- parsing and validation ---------------------------------------------------------------


@dataclass
class ParsedChunk:
    """One chunk's valid rows, typed but not yet transformed, and its rejected lines."""

    valid: pl.DataFrame  # label Int8; I* and C* Int64 with null = missing
    rejects: pl.DataFrame  # _line, reason, column, value
    lines: int


def _split_fields(chunk: bytes, first_line: int) -> pl.DataFrame:
    """Raw string fields of every line; fields a short line lacks are null."""
    if not chunk.isascii() or b"\x01" in chunk:
        chunk = chunk.translate(_UNSAFE_BYTES)
    lines = pl.read_csv(
        chunk,
        has_header=False,
        separator="\x01",
        quote_char=None,
        schema={_RAW: pl.String},
        raise_if_empty=False,
    )
    expected = chunk.count(b"\n") + (not chunk.endswith(b"\n"))
    if lines.height != expected:  # line numbers in rejects depend on this
        raise RuntimeError(f"polars framed {lines.height} lines where there are {expected}")
    # Materialised eagerly so the line is split once, not once per field it feeds.
    pieces = lines.with_columns(pl.col(_RAW).str.split("\t").alias("_pieces"))
    split = pieces.select(
        pl.col(_RAW),
        pl.col("_pieces").list.len().alias(_FIELD_COUNT),
        *[
            pl.col("_pieces").list.get(index, null_on_oob=True).alias(name)
            for index, name in enumerate(schema.RAW_COLUMNS)
        ],
    )
    return split.with_row_index(_LINE_NO, offset=first_line).with_columns(
        pl.col(_LINE_NO).cast(pl.Int64)
    )


def _present(name: str) -> pl.Expr:
    return (pl.col(name).str.len_bytes() > 0).fill_null(False)


def _integer(name: str) -> pl.Expr:
    return pl.col(name).cast(pl.Int64, strict=False)


def _problems() -> dict[str, pl.Expr]:
    """Per check, in reporting order, a boolean that is true when the row fails it."""
    checks = {
        "empty_line": pl.col(_RAW).is_null(),
        "too_many_fields": (pl.col(_FIELD_COUNT) > schema.NUM_RAW_FIELDS).fill_null(False),
        LABEL: pl.col(LABEL).is_in(["0", "1"]).fill_null(False).not_(),
    }
    for name in DENSE_FEATURES:
        checks[name] = _present(name) & _integer(name).is_null()
    for name in SPARSE_FEATURES:
        checks[name] = _present(name) & pl.col(name).str.contains(_HEX8).not_()
    return checks


def _reason_of(check: str) -> str:
    if check == LABEL:
        return "bad_label"
    if check in DENSE_FEATURES:
        return "bad_integer"
    if check in SPARSE_FEATURES:
        return "bad_categorical"
    return check


def _first_match(cases: list[tuple[pl.Expr, pl.Expr]]) -> pl.Expr:
    """The value of the first case whose condition holds."""
    (condition, value), *rest = cases
    chain = pl.when(condition).then(value)
    for condition, value in rest:
        chain = chain.when(condition).then(value)
    return chain


def _shown_value(check: str) -> pl.Expr:
    """What the rejects file shows for a failed check: the field's text or the field count."""
    if check == "too_many_fields":
        return pl.format("{} fields", pl.col(_FIELD_COUNT))
    if check in schema.RAW_COLUMNS:
        return pl.col(check).fill_null("").str.slice(0, 80)
    return pl.lit("")


def _column_of(check: str) -> pl.Expr:
    return pl.lit(check if check in schema.RAW_COLUMNS else None, pl.String)


def _describe_rejects(bad_rows: pl.DataFrame) -> pl.DataFrame:
    """Line number, reason, and the first offending column and its value, per bad row."""
    problems = _problems()

    def first_failed(describe: Callable[[str], pl.Expr]) -> pl.Expr:
        return _first_match([(failed, describe(check)) for check, failed in problems.items()])

    return bad_rows.select(
        pl.col(_LINE_NO),
        first_failed(lambda check: pl.lit(_reason_of(check))).alias("reason"),
        first_failed(_column_of).alias("column"),
        first_failed(_shown_value).alias("value"),
    )


def parse_chunk(chunk: bytes, first_line: int) -> ParsedChunk:
    """Split, validate and type one chunk; `first_line` is the 1-based number of its first line."""
    fields = _split_fields(chunk, first_line)
    typed = fields.select(
        pl.any_horizontal(list(_problems().values())).alias("_bad"),
        (pl.col(LABEL) == "1").cast(pl.Int8).alias(LABEL),
        *[_integer(name) for name in DENSE_FEATURES],
        *[pl.col(name).str.to_integer(base=16, strict=False) for name in SPARSE_FEATURES],
    )
    bad = typed["_bad"]
    if not bad.any():
        return ParsedChunk(typed.drop("_bad"), _NO_REJECTS, fields.height)
    return ParsedChunk(
        typed.filter(~bad).drop("_bad"),
        _describe_rejects(fields.filter(bad)),
        fields.height,
    )


@dataclass
class InputStats:
    """Row accounting for one input file."""

    source: Path
    day: int
    rows_in: int = 0
    rows_out: int = 0
    positives: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    logged_rejects: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, parsed: ParsedChunk) -> None:
        self.rows_in += parsed.lines
        self.rows_out += parsed.valid.height
        self.positives += int(parsed.valid[LABEL].sum())
        if parsed.rejects.height:
            self.rejected.update(dict(parsed.rejects["reason"].value_counts().iter_rows()))
            room = MAX_LOGGED_REJECTS - len(self.logged_rejects)
            self.logged_rejects.extend(parsed.rejects.head(room).to_dicts())

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def summary(self) -> dict[str, Any]:
        return {
            "input": str(self.source),
            "day": self.day,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "positives": self.positives,
            "rejected": self.rejected_total,
            "rejected_by_reason": {reason: self.rejected[reason] for reason in REJECT_REASONS},
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows_in / self.seconds) if self.seconds else None,
        }


def _scan(stats: InputStats) -> Iterator[ParsedChunk]:
    """Parse the whole input of `stats`, counting every chunk into it."""
    next_line = 1
    for chunk in _prefetched(_line_chunks(stats.source, CHUNK_BYTES)):
        parsed = parse_chunk(chunk, next_line)
        next_line += parsed.lines
        stats.add(parsed)
        yield parsed


def _write_rejects(out_dir: Path, stats: InputStats) -> Path:
    """The first rejected lines of one day as TSV; a clean day removes an older file."""
    path = out_dir / REJECTS_DIR / f"day={stats.day}.tsv"
    if not stats.logged_rejects:
        path.unlink(missing_ok=True)
        return path
    path.parent.mkdir(exist_ok=True)
    rows = ["file\tline\treason\tcolumn\tvalue"]
    for reject in stats.logged_rejects:
        rows.append(
            f"{stats.source}\t{reject[_LINE_NO]}\t{reject['reason']}\t"
            f"{reject['column'] or ''}\t{reject['value']}"
        )
    write_text_atomic(path, "\n".join(rows) + "\n")
    return path


def _check_rejects(stats: InputStats, max_fraction: float, out_dir: Path) -> None:
    """Log this input's rejects and fail when too many of its rows were bad."""
    rejects_path = _write_rejects(out_dir, stats)
    if stats.rows_in == 0:
        raise DataError(f"{stats.source}: no rows; refusing to publish an empty day {stats.day}")
    fraction = stats.rejected_total / stats.rows_in
    if fraction <= max_fraction:
        return
    first = stats.logged_rejects[0]
    where = f" {first['column']} = {first['value']!r}" if first["column"] else ""
    reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(stats.rejected.items()))
    raise DataError(
        f"{stats.source}: {stats.rejected_total} of {stats.rows_in} rows rejected "
        f"({fraction:.4%} > --max-reject-fraction {max_fraction:.4%}); first bad line "
        f"{first[_LINE_NO]}: {first['reason']}{where}; by reason: {reasons}; "
        f"see {rejects_path}. Nothing of day {stats.day} was published."
    )


# --- dense transform and categorical ids ---------------------------------------------------


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
        if self.dense_transform == "log1p":
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
        name: min(cardinality, MAX_HASH_TABLE_SIZE) + 1
        for name, cardinality in schema.CRITEO_KAGGLE_CARDINALITIES.items()
    }


def _validate_request(requested: Requested) -> None:
    if requested.dense_transform not in (None, "log1p", "minmax"):
        raise CtrscaleError(
            f"dense_transform must be 'log1p' or 'minmax', not {requested.dense_transform!r}"
        )
    if requested.ids not in (None, "hash", "vocab"):
        raise CtrscaleError(f"ids must be 'hash' or 'vocab', not {requested.ids!r}")
    if requested.table_size is not None and requested.table_size < 2:
        raise CtrscaleError("--table-size must be at least 2 (id 0 is reserved for missing)")
    if requested.min_count is not None and requested.min_count < 1:
        raise CtrscaleError("--min-count must be at least 1")


def _stored_encoding(out_dir: Path, meta: dict[str, Any], requested: Requested) -> Encoding:
    """The dataset's own encoding; explicit flags that contradict it are an error."""
    path = out_dir / schema.METADATA_FILE
    if meta.get("ids") not in ("hash", "vocab") or meta.get("dense_transform") not in (
        "log1p",
        "minmax",
    ):
        raise CtrscaleError(f"{path}: not written by `ctrscale prepare` (no ids/dense_transform)")
    conflicts = []
    if requested.dense_transform not in (None, meta["dense_transform"]):
        conflicts.append(f"--dense-transform {requested.dense_transform}")
    if requested.ids not in (None, meta["ids"]):
        conflicts.append(f"--ids {requested.ids}")
    if requested.table_size is not None and (
        meta["ids"] != "hash" or set(meta["table_sizes"].values()) != {requested.table_size}
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
        vocabulary=Vocabulary.load(out_dir) if meta["ids"] == "vocab" else None,
    )


def _fit_encoding(
    requested: Requested,
    jobs: list[tuple[Path, int]],
    out_dir: Path,
    max_reject_fraction: float,
    progress: Progress,
) -> Encoding:
    """A new dataset's encoding; min-max and vocabulary need one pass over all inputs."""
    dense_transform = requested.dense_transform or "log1p"
    ids = requested.ids or "hash"
    if ids == "vocab" and requested.table_size is not None:
        raise CtrscaleError("--table-size applies to --ids hash; a vocabulary sizes itself")
    if ids == "hash" and requested.min_count is not None:
        raise CtrscaleError("--min-count applies to --ids vocab only")
    if dense_transform == "log1p" and ids == "hash":
        return Encoding(dense_transform, ids, _hash_table_sizes(requested.table_size))

    progress(f"fitting {dense_transform} / {ids} on {len(jobs)} input(s) (first pass)")
    dense_range = DenseRange() if dense_transform == "minmax" else None
    counter = VocabCounter() if ids == "vocab" else None
    for source, day in jobs:
        stats = InputStats(source, day)
        for parsed in _scan(stats):
            if counter is not None:
                counter.update(parsed.valid.select(SPARSE_FEATURES))
            if dense_range is not None:
                dense_range.update(parsed.valid)
        _check_rejects(stats, max_reject_fraction, out_dir)

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


# --- writing and publishing ---------------------------------------------------------------


class PartitionWriter:
    """Parts of one day in a hidden temp dir: exact row groups, a fixed number per file.

    Writes run in a background thread, one table behind the parser, so encoding the next
    chunk overlaps Parquet encoding and disk I/O while memory stays at a couple of chunks.
    """

    def __init__(self, tmp_dir: Path, row_group_rows: int) -> None:
        self.tmp_dir = tmp_dir
        self.row_group_rows = row_group_rows
        self.files: list[dict[str, Any]] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._last: Future | None = None

    def write(self, table: pa.Table) -> None:
        self._wait()
        self._last = self._pool.submit(self._add, table)

    def finish(self) -> list[dict[str, Any]]:
        """Flush the last rows and close; the per-file list for the manifest."""
        self._wait()
        self._pool.submit(self._flush_all).result()
        self._pool.shutdown()
        return self.files

    def abort(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        if self._writer is not None:
            self._writer.close()

    def _wait(self) -> None:
        if self._last is not None:
            self._last.result()
            self._last = None

    def _add(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.row_group_rows:
            whole = self._pending_rows - self._pending_rows % self.row_group_rows
            self._write_rows(whole)

    def _flush_all(self) -> None:
        if self._pending_rows:
            self._write_rows(self._pending_rows)
        self._close_file()

    def _write_rows(self, count: int) -> None:
        """Write the first `count` pending rows, rolling files every ROW_GROUPS_PER_FILE groups."""
        pending = pa.concat_tables(self._pending)
        written = 0
        while written < count:
            if self._writer is None:
                self._open_file()
            room = ROW_GROUPS_PER_FILE * self.row_group_rows - self._file_rows
            take = min(room, count - written)
            self._writer.write_table(
                pending.slice(written, take), row_group_size=self.row_group_rows
            )
            self._file_rows += take
            written += take
            if self._file_rows == ROW_GROUPS_PER_FILE * self.row_group_rows:
                self._close_file()
        rest = pending.slice(count)
        self._pending, self._pending_rows = [rest], rest.num_rows

    def _open_file(self) -> None:
        name = f"part-{len(self.files):05d}.parquet"
        self._writer = pq.ParquetWriter(
            self.tmp_dir / name, schema.PARQUET_SCHEMA, compression="zstd"
        )
        self.files.append({"path": name, "rows": 0, "sha256": None})
        self._file_rows = 0

    def _close_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        entry = self.files[-1]
        entry["rows"] = self._file_rows
        entry["sha256"] = sha256_file(self.tmp_dir / entry["path"], sync=True)


def _convert_day(
    stats: InputStats,
    encoding: Encoding,
    out_dir: Path,
    row_group_rows: int,
    max_reject_fraction: float,
) -> None:
    """Write one input as `out_dir/day=N/`; nothing becomes visible unless it all succeeds."""
    day = stats.day
    tmp_dir = out_dir / f"{TMP_PREFIX}day={day}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    writer = PartitionWriter(tmp_dir, row_group_rows)
    started = time.perf_counter()
    try:
        for parsed in _scan(stats):
            if parsed.valid.height:
                writer.write(encoding.encode(parsed.valid))
        files = writer.finish()
        _check_rejects(stats, max_reject_fraction, out_dir)
        manifest = {
            "day": day,
            "source": str(stats.source),
            "rows": stats.rows_out,
            "positives": stats.positives,
            "files": files,
        }
        write_json_atomic(tmp_dir / MANIFEST_FILE, manifest)
        publish_dir(tmp_dir, out_dir / f"day={day}")
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    finally:
        stats.seconds = time.perf_counter() - started


# --- the job ------------------------------------------------------------------------------


def _assign_days(inputs: list[Path], days: list[int] | None) -> list[int]:
    """`days` as given, else N from names like day_N(.gz), else 0, 1, 2, … in input order."""
    if days is not None:
        if len(days) != len(inputs):
            raise CtrscaleError(f"{len(days)} --day values for {len(inputs)} inputs; give one each")
        assigned = list(days)
    else:
        matches = [_DAY_NAME.match(path.name) for path in inputs]
        if all(matches):
            assigned = [int(match.group(1)) for match in matches]
        elif any(matches):
            raise CtrscaleError(
                "some inputs are named day_N and some are not; give --day for each input"
            )
        else:
            assigned = list(range(len(inputs)))
    if any(day < 0 for day in assigned):
        raise CtrscaleError(f"day numbers must be >= 0, got {assigned}")
    if len(set(assigned)) != len(assigned):
        raise CtrscaleError(f"two inputs map to the same day ({assigned}); give distinct --day")
    return assigned


def _remove_stale_temp_dirs(out_dir: Path) -> None:
    """Leftovers of crashed runs; safe to delete because we hold the dataset lock."""
    for leftover in out_dir.glob(f"{TMP_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)


def _existing_metadata(out_dir: Path) -> dict[str, Any] | None:
    if (out_dir / schema.METADATA_FILE).exists():
        return schema.read_metadata(out_dir)
    if any(out_dir.glob("day=*")):
        raise CtrscaleError(
            f"{out_dir} has day=N partitions but no metadata.json (an interrupted first "
            "prepare?); remove them or use a new --out"
        )
    return None


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_files(
    inputs: list[Path],
    out_dir: Path,
    days: list[int] | None = None,
    dense_transform: str | None = None,
    ids: str | None = None,
    table_size: int | None = None,
    min_count: int | None = None,
    max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Convert raw Criteo TSV files into (or onto) the dataset at `out_dir`; the run summary.

    Each input becomes one published `day=N` partition. An existing dataset's encoding
    (transform, min/max, hash sizes, vocabulary) is reused; contradicting flags raise
    `CtrscaleError`. Too many bad rows in an input raise `DataError` and publish nothing of it.
    """
    progress = progress or (lambda _message: None)
    inputs, out_dir = [Path(path) for path in inputs], Path(out_dir)
    requested = Requested(dense_transform, ids, table_size, min_count)
    _validate_request(requested)
    if not 0.0 <= max_reject_fraction <= 1.0:
        raise CtrscaleError("--max-reject-fraction must be within [0, 1]")
    if row_group_rows < 1:
        raise CtrscaleError("--row-group-rows must be at least 1")
    for path in inputs:
        if not path.is_file():
            raise CtrscaleError(f"{path}: no such input file")
    jobs = list(zip(inputs, _assign_days(inputs, days), strict=True))

    out_dir.mkdir(parents=True, exist_ok=True)
    with ExclusiveLock(out_dir / LOCK_FILE, "another `ctrscale prepare` is writing this dataset"):
        _remove_stale_temp_dirs(out_dir)
        if not overwrite:
            taken = [f"day={day}" for _, day in jobs if (out_dir / f"day={day}").exists()]
            if taken:
                raise CtrscaleError(
                    f"{out_dir}: {', '.join(taken)} already exist; pass --overwrite to replace"
                )
        started = time.perf_counter()
        summary: dict[str, Any] = {"out": str(out_dir), "status": "failed", "inputs": []}
        try:
            _run(jobs, out_dir, requested, max_reject_fraction, row_group_rows, progress, summary)
            summary["status"] = "ok"
        except CtrscaleError as exc:
            summary["error"] = str(exc)
            raise
        finally:
            _finish_summary(summary, time.perf_counter() - started)
            write_json_atomic(out_dir / SUMMARY_FILE, summary)
    return summary


def _run(
    jobs: list[tuple[Path, int]],
    out_dir: Path,
    requested: Requested,
    max_reject_fraction: float,
    row_group_rows: int,
    progress: Progress,
    summary: dict[str, Any],
) -> None:
    meta = _existing_metadata(out_dir)
    if meta is None:
        fit_started = time.perf_counter()
        encoding = _fit_encoding(requested, jobs, out_dir, max_reject_fraction, progress)
        summary["fit_seconds"] = round(time.perf_counter() - fit_started, 3)
        if encoding.vocabulary is not None:
            encoding.vocabulary.save(out_dir)
        meta = {**encoding.metadata(), "days": {}}
    else:
        encoding = _stored_encoding(out_dir, meta, requested)
    for source, day in jobs:
        progress(f"day {day}: converting {source}")
        stats = InputStats(source, day)
        try:
            _convert_day(stats, encoding, out_dir, row_group_rows, max_reject_fraction)
        finally:  # a failed input's counts belong in the summary too
            summary["inputs"].append(stats.summary())
        meta["days"][str(day)] = {
            "rows": stats.rows_out,
            "positives": stats.positives,
            "source": str(source),
        }
        write_json_atomic(out_dir / schema.METADATA_FILE, meta)
        progress(_describe_input(stats.summary()))


def _finish_summary(summary: dict[str, Any], seconds: float) -> None:
    inputs = summary["inputs"]
    summary["rows_in"] = sum(entry["rows_in"] for entry in inputs)
    summary["rows_out"] = sum(entry["rows_out"] for entry in inputs)
    summary["rejected"] = sum(entry["rejected"] for entry in inputs)
    summary["rejected_by_reason"] = {
        reason: sum(entry["rejected_by_reason"][reason] for entry in inputs)
        for reason in REJECT_REASONS
    }
    summary["seconds"] = round(seconds, 3)
    summary["rows_per_s"] = round(summary["rows_in"] / seconds) if seconds else None


def _describe_input(entry: dict[str, Any]) -> str:
    reasons = ", ".join(f"{k}={v}" for k, v in entry["rejected_by_reason"].items() if v)
    return (
        f"day {entry['day']} ({entry['input']}): {entry['rows_in']:,} rows in, "
        f"{entry['rows_out']:,} out, {entry['rejected']:,} rejected"
        f"{f' ({reasons})' if reasons else ''}; {entry['seconds']:.1f} s, "
        f"{entry['rows_per_s'] or 0:,} rows/s"
    )


def run_cli(args: argparse.Namespace) -> int:
    """`ctrscale prepare`: convert, print the summary, exit 0 (errors raise CtrscaleError)."""
    summary = prepare_files(
        inputs=[Path(path) for path in args.inputs],
        out_dir=Path(args.out),
        days=args.day,
        dense_transform=args.dense_transform,
        ids=args.ids,
        table_size=args.table_size,
        min_count=args.min_count,
        max_reject_fraction=args.max_reject_fraction,
        row_group_rows=args.row_group_rows,
        overwrite=args.overwrite,
        progress=_print_stderr,
    )
    print(
        f"prepared {len(summary['inputs'])} day(s) into {summary['out']}: "
        f"{summary['rows_in']:,} rows in, {summary['rows_out']:,} out, "
        f"{summary['rejected']:,} rejected; {summary['seconds']:.1f} s, "
        f"{summary['rows_per_s'] or 0:,} rows/s (details: {Path(summary['out']) / SUMMARY_FILE})"
    )
    return 0
