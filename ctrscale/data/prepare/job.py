"""The prepare job: inputs → published days of one dataset, its metadata and its summary.

Owns `prepare_files` and `ctrscale prepare`: checking the request, assigning inputs to days,
holding the dataset lock, fitting a new dataset's encoding or reusing the stored one,
converting each input (`writer.py`), updating metadata.json after every day, and the run
summary (`summary.json` and the lines printed).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ctrscale.data import schema
from ctrscale.data.prepare.encoding import (
    Progress,
    Requested,
    fit_encoding,
    stored_encoding,
    validate_request,
)
from ctrscale.data.prepare.parse import REJECT_REASONS, InputStats
from ctrscale.data.prepare.writer import TMP_PREFIX, convert_day
from ctrscale.errors import CtrscaleError
from ctrscale.files import usable_directory, write_json_atomic
from ctrscale.locking import ExclusiveLock
from ctrscale.storage import is_uri

DEFAULT_ROW_GROUP_ROWS = 131_072
DEFAULT_MAX_REJECT_FRACTION = 0.001
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".prepare.lock"
_DAY_NAME = re.compile(r"^day_(\d+)(\.[A-Za-z0-9]+)*$")


def assign_days(inputs: list[Path], days: list[int] | None) -> list[int]:
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
    short_lines: bool = False,
) -> dict[str, Any]:
    """Convert raw Criteo TSV files into (or onto) the dataset at `out_dir`; the run summary.

    Each input becomes one published `day=N` partition. A line with fewer than 40 fields is
    rejected (`too_few_fields`) unless `short_lines`: then its missing trailing fields are
    empty (for files whose trailing tabs were stripped). An existing dataset's encoding
    (transform, min/max, hash sizes, vocabulary) is reused; contradicting flags raise
    `CtrscaleError`. Too many bad rows in an input raise `DataError` and publish nothing of it.
    """
    progress = progress or (lambda _message: None)
    # Absolute: the summary and metadata.json say where each day came from, from anywhere.
    inputs, out_dir = [Path(path).resolve() for path in inputs], Path(out_dir)
    requested = Requested(dense_transform, ids, table_size, min_count)
    validate_request(requested)
    if not 0.0 <= max_reject_fraction <= 1.0:
        raise CtrscaleError("--max-reject-fraction must be within [0, 1]")
    if row_group_rows < 1:
        raise CtrscaleError("--row-group-rows must be at least 1")
    for path in inputs:
        if not path.is_file():
            raise CtrscaleError(f"{path}: no such input file")
    jobs = list(zip(inputs, assign_days(inputs, days), strict=True))

    usable_directory(out_dir, "--out")
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
            _run(
                jobs, out_dir, requested, max_reject_fraction, row_group_rows, progress,
                summary, short_lines,
            )  # fmt: skip
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
    short_lines: bool,
) -> None:
    meta = _existing_metadata(out_dir)
    if meta is None:
        fit_started = time.perf_counter()
        encoding = fit_encoding(
            requested, jobs, out_dir, max_reject_fraction, progress, short_lines
        )
        summary["fit_seconds"] = round(time.perf_counter() - fit_started, 3)
        if encoding.vocabulary is not None:
            encoding.vocabulary.save(out_dir)
        meta = {**encoding.metadata(), "days": {}}
    else:
        encoding = stored_encoding(out_dir, meta, requested)
    for source, day in jobs:
        progress(f"day {day}: converting {source}")
        stats = InputStats(source, day, short_lines, progress)
        try:
            convert_day(stats, encoding, out_dir, row_group_rows, max_reject_fraction)
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
    if is_uri(args.out):
        from ctrscale.data.prepare.store import prepare_to_store

        def prepare(inputs, out_dir, **options):
            return prepare_to_store(inputs, args.out, **options)
    else:
        prepare = prepare_files
    summary = prepare(
        inputs=[Path(path).resolve() for path in args.inputs],
        out_dir=args.out,
        days=args.day,
        dense_transform=args.dense_transform,
        ids=args.ids,
        table_size=args.table_size,
        min_count=args.min_count,
        max_reject_fraction=args.max_reject_fraction,
        row_group_rows=args.row_group_rows,
        overwrite=args.overwrite,
        short_lines=args.short_lines,
        progress=_print_stderr,
    )
    print(
        f"prepared {len(summary['inputs'])} day(s) into {summary['out']}: "
        f"{summary['rows_in']:,} rows in, {summary['rows_out']:,} out, "
        f"{summary['rejected']:,} rejected; {summary['seconds']:.1f} s, "
        f"{summary['rows_per_s'] or 0:,} rows/s (details: {summary['out']}/{SUMMARY_FILE})"
    )
    return 0
