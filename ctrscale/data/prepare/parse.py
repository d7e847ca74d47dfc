"""Reading and validating raw Criteo TSV: input files → typed rows and counted rejects.

Owns reading raw lines in bounded chunks (gzip recognised by its magic number), splitting and
validating them with polars expressions, typing the valid rows (label Int8; I* and C* Int64,
null = missing), and the reject accounting: counts per reason, the first rejected lines
written to `DIR/rejects/day=N.tsv`, and the `--max-reject-fraction` verdict.

Why chunks of whole lines fed to polars instead of `pl.scan_csv`: one code path for plain and
gzip input (polars decompresses a .gz fully into memory), exact 1-based line numbers for
rejects, and ragged or corrupt lines handled by polars string ops instead of aborting the
reader. Peak memory is a few chunks, independent of the input size.
"""

from __future__ import annotations

import gzip
import time
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import polars as pl

from ctrscale.data import schema
from ctrscale.data.schema import DENSE_FEATURES, LABEL, SPARSE_FEATURES
from ctrscale.errors import DataError
from ctrscale.files import write_text_atomic

CHUNK_BYTES = 8 << 20  # ~35k Criteo lines; larger chunks cost memory, not CPU
MAX_LINE_BYTES = 1 << 20
MAX_LOGGED_REJECTS = 1000
PROGRESS_SECONDS = 30.0  # a line per input at most this often: long inputs show they move
REJECTS_DIR = "rejects"

REJECT_REASONS = (
    "empty_line",
    "too_many_fields",
    "too_few_fields",
    "bad_label",
    "bad_integer",
    "bad_categorical",
)

_FIELD_COUNT = "_fields"
_LINE_NO = "_line"
_RAW = "_raw"
_HEX8 = r"^[0-9a-fA-F]{8}$"
# \x01 is the separator that makes polars read each line as one field, and polars refuses
# invalid UTF-8; such bytes can only sit in an invalid field, so '?' keeps the row rejected
# for the same reason and keeps it on its own line.
_UNSAFE_BYTES = bytes.maketrans(bytes([1, *range(128, 256)]), b"?" * 129)

_NO_REJECTS = pl.DataFrame(
    schema={_LINE_NO: pl.Int64, "reason": pl.String, "column": pl.String, "value": pl.String}
)

T = TypeVar("T")


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


def _problems(short_lines_ok: bool) -> dict[str, pl.Expr]:
    """Per check, in reporting order, a boolean that is true when the row fails it."""
    checks = {
        "empty_line": pl.col(_RAW).is_null(),
        "too_many_fields": (pl.col(_FIELD_COUNT) > schema.NUM_RAW_FIELDS).fill_null(False),
    }
    if not short_lines_ok:
        # Criteo writes every field, empty or not: a short line is cut or of another format
        # (unless the file's trailing empty fields were stripped: `--short-lines`).
        checks["too_few_fields"] = (pl.col(_FIELD_COUNT) < schema.NUM_RAW_FIELDS).fill_null(False)
    checks[LABEL] = pl.col(LABEL).is_in(["0", "1"]).fill_null(False).not_()
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
    if check in ("too_many_fields", "too_few_fields"):
        return pl.format("{} fields", pl.col(_FIELD_COUNT))
    if check in schema.RAW_COLUMNS:
        return pl.col(check).fill_null("").str.slice(0, 80)
    return pl.lit("")


def _column_of(check: str) -> pl.Expr:
    return pl.lit(check if check in schema.RAW_COLUMNS else None, pl.String)


def _describe_rejects(bad_rows: pl.DataFrame, short_lines_ok: bool) -> pl.DataFrame:
    """Line number, reason, and the first offending column and its value, per bad row."""
    problems = _problems(short_lines_ok)

    def first_failed(describe: Callable[[str], pl.Expr]) -> pl.Expr:
        return _first_match([(failed, describe(check)) for check, failed in problems.items()])

    return bad_rows.select(
        pl.col(_LINE_NO),
        first_failed(lambda check: pl.lit(_reason_of(check))).alias("reason"),
        first_failed(_column_of).alias("column"),
        first_failed(_shown_value).alias("value"),
    )


def parse_chunk(chunk: bytes, first_line: int, short_lines_ok: bool = False) -> ParsedChunk:
    """Split, validate and type one chunk; `first_line` is the 1-based number of its first line.
    `short_lines_ok`: a line with fewer than 40 fields has its trailing fields empty."""
    fields = _split_fields(chunk, first_line)
    typed = fields.select(
        pl.any_horizontal(list(_problems(short_lines_ok).values())).alias("_bad"),
        (pl.col(LABEL) == "1").cast(pl.Int8).alias(LABEL),
        *[_integer(name) for name in DENSE_FEATURES],
        *[pl.col(name).str.to_integer(base=16, strict=False) for name in SPARSE_FEATURES],
    )
    bad = typed["_bad"]
    if not bad.any():
        return ParsedChunk(typed.drop("_bad"), _NO_REJECTS, fields.height)
    return ParsedChunk(
        typed.filter(~bad).drop("_bad"),
        _describe_rejects(fields.filter(bad), short_lines_ok),
        fields.height,
    )


@dataclass
class InputStats:
    """Row accounting for one input file."""

    source: Path
    day: int
    short_lines_ok: bool = False
    progress: Callable[[str], None] | None = None
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


def scan(stats: InputStats) -> Iterator[ParsedChunk]:
    """Parse the whole input of `stats`, counting every chunk into it."""
    next_line, reported = 1, time.monotonic()
    for chunk in _prefetched(_line_chunks(stats.source, CHUNK_BYTES)):
        parsed = parse_chunk(chunk, next_line, stats.short_lines_ok)
        next_line += parsed.lines
        stats.add(parsed)
        if stats.progress is not None and time.monotonic() - reported >= PROGRESS_SECONDS:
            stats.progress(
                f"day {stats.day}: {stats.rows_in:,} lines of {stats.source.name} read, "
                f"{stats.rejected_total:,} rejected"
            )
            reported = time.monotonic()
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


def check_rejects(stats: InputStats, max_fraction: float, out_dir: Path) -> None:
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
