"""The dataset on disk as the loader plans it: paths → sorted files → row groups.

Owns resolving dataset directories, `day=N` directories, files and globs to a sorted list of
unique `.parquet` files, finding the dataset root a file belongs to (where `metadata.json`
lives), opening each file's footer (schema-checked by `validation.py`), the flat list of
non-empty row groups every epoch is planned from, and the table sizes the roots' metadata
gives. Nothing here decodes data: all of it comes from directory listings and footers.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ctrscale.data import schema
from ctrscale.data.loader.validation import check_file_schema
from ctrscale.errors import DataError

_DAY_DIRECTORY = re.compile(r"day=\d+")


# ---------------------------------------------------------------------------------------------
# Paths


def _is_ignored(name: str) -> bool:
    """Hidden entries, `.tmp-*` writes in progress and `_SUCCESS`-style markers."""
    return name.startswith((".", "_"))


def _natural_key(path: Path) -> list[Any]:
    """Sort `day=2` before `day=10` and `part-9` before `part-10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _parquet_files_under(directory: Path) -> list[Path]:
    found = []
    for parent, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not _is_ignored(d)]
        found += [Path(parent, f) for f in files if f.endswith(".parquet") and not _is_ignored(f)]
    return found


def _glob_matches(pattern: str) -> list[Path]:
    """Glob matches, dropping those whose wildcard-matched components are ignored entries."""
    literal_depth = 0
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        literal_depth += 1
    return [
        Path(match)
        for match in glob.glob(pattern, recursive=True)
        if not any(_is_ignored(part) for part in Path(match).parts[literal_depth:])
    ]


def resolve_parquet_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Dataset directories, `day=N` directories, files and globs → sorted, unique files."""
    files: set[Path] = set()
    for raw in paths:
        text = os.fspath(raw)
        if glob.has_magic(text):
            matches = _glob_matches(text)
            if not matches:
                raise DataError(f"{text}: the pattern matches no files")
        else:
            if not os.path.exists(text):
                raise DataError(f"{text}: no such file or directory")
            matches = [Path(text)]
        for match in matches:
            found = _parquet_files_under(match) if match.is_dir() else [match]
            if match.is_dir() and not found:
                raise DataError(f"{match}: no .parquet files in this directory")
            files.update(f.resolve() for f in found)
    if not files:
        raise DataError(f"no Parquet files in {[os.fspath(p) for p in paths]}")
    return sorted(files, key=_natural_key)


def dataset_root(file: Path) -> Path:
    """The directory holding the `day=N` partitions (and metadata.json) a file belongs to."""
    for ancestor in file.parents:
        if _DAY_DIRECTORY.fullmatch(ancestor.name):
            return ancestor.parent
    return file.parent


# ---------------------------------------------------------------------------------------------
# Files and row groups


@dataclass(frozen=True)
class ParquetFile:
    path: Path
    file_id: str  # path relative to its dataset root: the holdout hash's stable file id
    metadata: pq.FileMetaData


@dataclass(frozen=True)
class RowGroup:
    file: int  # index into the loader's file list
    index: int  # row group index within the file
    first_row: int  # index in the file of the row group's first row
    num_rows: int


def open_files(files: list[Path], extras: Sequence[str]) -> list[ParquetFile]:
    """The files' footers, each checked against the schema (and the requested extra columns)."""
    opened = []
    for path in files:
        try:
            metadata = pq.read_metadata(path)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        check_file_schema(path, metadata, extras)
        file_id = path.relative_to(dataset_root(path)).as_posix()
        opened.append(ParquetFile(path, file_id, metadata))
    return opened


def row_groups(files: list[ParquetFile]) -> list[RowGroup]:
    """Every non-empty row group of the files, in file order."""
    groups = []
    for file_index, file in enumerate(files):
        first_row = 0
        for index in range(file.metadata.num_row_groups):
            num_rows = file.metadata.row_group(index).num_rows
            if num_rows:
                groups.append(RowGroup(file_index, index, first_row, num_rows))
            first_row += num_rows
    return groups


def table_sizes_from_metadata(files: list[ParquetFile]) -> dict[str, int]:
    """The table sizes of the dataset root(s); several roots must agree."""
    sizes_by_root: dict[Path, dict[str, int]] = {}
    for root in sorted({dataset_root(f.path) for f in files}):
        try:
            sizes_by_root[root] = schema.read_metadata(root)["table_sizes"]
        except (FileNotFoundError, ValueError, DataError) as exc:
            raise DataError(f"{exc} (or pass table_sizes explicitly)") from None
    (first_root, sizes), *others = sizes_by_root.items()
    for root, other in others:
        if other != sizes:
            raise DataError(
                f"{root}/{schema.METADATA_FILE} and {first_root}/{schema.METADATA_FILE} give "
                "different table_sizes: the datasets cannot be read as one"
            )
    return sizes
