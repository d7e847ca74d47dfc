"""Dates → verified Parquet day partitions, prepared from raw TSV when missing or damaged.

A date D is the partition `dataset/day=YYYYMMDD` (the integer YYYYMMDD is the day number
`prepare_files` gets, so partitions sort by date) and the raw file `refresh.raw_pattern`
formatted with {date} = YYYY-MM-DD and {yyyymmdd}. A partition counts as prepared only when
its `_manifest.json` verifies: the listed files and no others, each with its sha256 and its
Parquet row count, summing to the manifest's rows. Anything else is prepared again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import date as Date
from pathlib import Path

import pyarrow.parquet as pq

from ctrscale.config import RefreshConfig
from ctrscale.data import schema
from ctrscale.data.prepare import MANIFEST_FILE, prepare_files
from ctrscale.data.schema import sha256_file
from ctrscale.errors import DataError

log = logging.getLogger("ctrscale.refresh")


def day_number(day: Date) -> int:
    return int(day.strftime("%Y%m%d"))


def partition_dir(dataset: str | Path, day: Date) -> Path:
    return Path(dataset) / f"day={day_number(day)}"


def raw_file(pattern: str, day: Date) -> Path:
    return Path(pattern.format(date=day.isoformat(), yyyymmdd=f"{day_number(day)}"))


def partition_problem(partition: Path) -> str | None:
    """Why `partition` cannot be trusted, or None when its manifest verifies."""
    try:
        manifest = json.loads((partition / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}"
    except json.JSONDecodeError as exc:
        return f"unreadable {MANIFEST_FILE} ({exc})"
    listed = {entry["path"]: entry for entry in manifest["files"]}
    present = {path.name for path in partition.glob("*.parquet")}
    if present != set(listed):
        return f"files {sorted(present)} differ from the manifest's {sorted(listed)}"
    for name, entry in listed.items():
        path = partition / name
        if sha256_file(path) != entry["sha256"]:
            return f"{name}: sha256 differs from the manifest"
        if pq.read_metadata(path).num_rows != entry["rows"]:
            return f"{name}: row count differs from the manifest"
    if sum(entry["rows"] for entry in listed.values()) != manifest["rows"]:
        return "the files' rows do not add up to the manifest's total"
    return None


def ensure_partition(refresh: RefreshConfig, day: Date, *, required: bool) -> Path | None:
    """The verified partition of `day`, prepared (again) from its raw file when needed.

    Without a partition and a raw file, a `required` day raises `DataError`; another is None.
    """
    partition = partition_dir(refresh.dataset, day)
    problem = partition_problem(partition) if partition.exists() else "not prepared yet"
    if problem is None:
        log.info("%s: %s verifies, not preparing it again", day, partition)
        return partition
    raw = raw_file(refresh.raw_pattern, day)
    if not raw.is_file():
        if not required:
            log.warning(
                "%s: %s (%s) and no raw file %s; leaving it out", day, partition, problem, raw
            )
            return None
        raise DataError(f"{day}: no raw input {raw} (pattern refresh.raw_pattern) for {partition}")
    log.info("%s: preparing %s from %s (%s)", day, partition, raw, problem)
    prepare_files(
        [raw],
        Path(refresh.dataset),
        days=[day_number(day)],
        dense_transform=refresh.dense_transform,
        ids=refresh.ids,
        table_size=refresh.table_size,
        min_count=refresh.min_count,
        max_reject_fraction=refresh.max_reject_fraction,
        overwrite=partition.exists(),
        progress=log.info,
    )
    return partition


def encoding_fingerprint(dataset: str | Path) -> str:
    """sha256 of how raw values become ids and dense values (metadata.json minus the days
    list): models may only be warm-started across days whose fingerprints are equal."""
    meta = schema.read_metadata(dataset)
    meta.pop("days", None)
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
