"""`ctrscale synth` and `generate()`: the days of a synthetic dataset and its metadata.

Owns the arguments, the day loop (chunks from `rows.py` written by `days.py`, the Bayes
metrics of each day and of "all" updated in metadata.json after every day), and extending a
directory: generating into one made earlier with the same seed, scale and format adds (or
regenerates) days of the same teacher. `DIR/metadata.json` records table sizes, the teacher
and the per-day Bayes metrics.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ctrscale.data import schema
from ctrscale.data.synth.days import (
    HEX_MULTIPLIER,
    empty_counts,
    hex_salt,
    read_truth,
    split_metrics,
    write_day,
    write_truth,
)
from ctrscale.data.synth.rows import chunks_in_order, worker_count
from ctrscale.data.synth.teacher import Teacher, build_teacher
from ctrscale.errors import CtrscaleError
from ctrscale.files import write_json_atomic

GENERATOR = "ctrscale.synth"


def generate(
    out_dir: str | Path,
    rows_per_day: int,
    days: int = 1,
    seed: int = 0,
    cardinality_scale: float = 0.01,
    fmt: str = "parquet",
    first_day: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write days first_day … first_day+days-1 into out_dir and return the updated metadata.

    Generating into a directory made earlier with the same seed, scale and format adds days
    of the same teacher (or, with `overwrite`, regenerates existing ones); their entries are
    merged into metadata.json and "all" is recomputed exactly over every day it holds.
    """
    _check_arguments(rows_per_day, days, seed, cardinality_scale, fmt, first_day)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = build_teacher(seed, cardinality_scale)
    metadata = _metadata_to_extend(out, seed, cardinality_scale, fmt, teacher)
    new_days = range(first_day, first_day + days)
    existing = [f"day={d}" for d in new_days if f"day={d}" in metadata["splits"]]
    if existing and not overwrite:
        rows = ", ".join(f"{name} ({metadata['splits'][name]['rows']:,} rows)" for name in existing)
        raise CtrscaleError(
            f"{out} already holds {rows}: pass --overwrite to replace, or --first-day to add "
            "new days"
        )
    kept_days = [
        int(split.removeprefix("day="))
        for split in metadata["splits"]
        if split.startswith("day=") and int(split.removeprefix("day=")) not in new_days
    ]
    all_counts = sum((read_truth(out, day) for day in kept_days), empty_counts())
    workers = worker_count()
    with ThreadPoolExecutor(workers) as pool:
        for day in new_days:
            chunks = chunks_in_order(pool, workers + 1, teacher, seed, day, rows_per_day)
            counts = write_day(out, day, fmt, chunks)
            write_truth(out, day, counts)
            all_counts += counts
            metadata["splits"][f"day={day}"] = split_metrics(counts)
            metadata["splits"]["all"] = split_metrics(all_counts)
            write_json_atomic(out / schema.METADATA_FILE, metadata)
    return metadata


def run_cli(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    metadata = generate(
        args.out,
        rows_per_day=args.rows,
        days=args.days,
        seed=args.seed,
        cardinality_scale=args.cardinality_scale,
        fmt=args.format,
        first_day=args.first_day,
        overwrite=args.overwrite,
    )
    seconds = time.perf_counter() - started
    print(
        f"ctrscale synth: {args.days} day(s) × {args.rows:,} rows → {args.out} "
        f"({args.format}, seed {args.seed}, cardinality scale {args.cardinality_scale})"
    )
    new_days = [f"day={day}" for day in range(args.first_day, args.first_day + args.days)]
    for split in [*new_days, "all"]:
        entry = metadata["splits"][split]
        auc = "n/a" if entry["bayes_auc"] is None else f"{entry['bayes_auc']:.5f}"
        print(
            f"  {split:<8} rows {entry['rows']:>12,}  CTR {entry['ctr']:.4f}  "
            f"Bayes AUC {auc}  Bayes LogLoss {entry['bayes_logloss']:.5f}"
        )
    rows = args.rows * args.days
    print(f"  {seconds:.1f} s, {rows / seconds:,.0f} rows/s")
    return 0


def _check_arguments(
    rows_per_day: int, days: int, seed: int, cardinality_scale: float, fmt: str, first_day: int
) -> None:
    if rows_per_day < 1:
        raise CtrscaleError(f"--rows must be at least 1, got {rows_per_day}")
    if days < 1:
        raise CtrscaleError(f"--days must be at least 1, got {days}")
    if first_day < 0:
        raise CtrscaleError(f"--first-day must be non-negative, got {first_day}")
    if seed < 0:
        raise CtrscaleError(f"--seed must be non-negative, got {seed}")
    # Above 1 the tables would outgrow Criteo's own; the teacher holds them in memory.
    if not 0 < cardinality_scale <= 1:
        raise CtrscaleError(f"--cardinality-scale must be in (0, 1], got {cardinality_scale}")
    if fmt not in ("parquet", "tsv"):
        raise CtrscaleError(f"--format must be parquet or tsv, got {fmt!r}")


def _metadata_to_extend(
    out: Path, seed: int, cardinality_scale: float, fmt: str, teacher: Teacher
) -> dict[str, Any]:
    """Fresh metadata, or the directory's own when it was made by the same teacher and format."""
    fresh: dict[str, Any] = {
        "version": schema.METADATA_VERSION,
        "generator": GENERATOR,
        "seed": seed,
        "cardinality_scale": cardinality_scale,
        "format": fmt,
        "table_sizes": {
            name: int(count) + 1  # + id 0, reserved for "missing"
            for name, count in zip(schema.SPARSE_FEATURES, teacher.value_counts, strict=True)
        },
        "dense_transform": "log1p" if fmt == "parquet" else "raw",
        "ids": "synthetic" if fmt == "parquet" else "synthetic-hex",
        "teacher": teacher.describe(),
        "splits": {},
    }
    if fmt == "tsv":
        fresh["hex_scramble"] = {
            "formula": "(id * multiplier + salt) mod 2^32",
            "multiplier": HEX_MULTIPLIER,
            "salts": {name: hex_salt(name) for name in schema.SPARSE_FEATURES},
        }
    fresh = _json_roundtrip(fresh)
    path = out / schema.METADATA_FILE
    if not path.exists():
        return fresh
    try:
        existing = schema.read_metadata(out)
    except ValueError as exc:
        raise CtrscaleError(str(exc)) from None
    if existing.get("generator") != GENERATOR:
        raise CtrscaleError(f"{path}: this directory holds a dataset not made by ctrscale synth")
    for key in ("version", "seed", "cardinality_scale", "format", "table_sizes", "teacher"):
        if existing.get(key) != fresh[key]:
            raise CtrscaleError(
                f"{path}: its {key!r} differs from this run's; new days must come from the same "
                "teacher (same seed, --cardinality-scale, --format and ctrscale version)"
            )
    return existing


def _json_roundtrip(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as metadata.json will read back (tuples → lists, numpy → Python)."""
    return json.loads(json.dumps(payload))
