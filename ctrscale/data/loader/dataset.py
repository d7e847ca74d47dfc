"""The dataset as the loader plans it: paths → sorted files → row groups.

Owns resolving dataset directories, `day=N` directories, files and globs to a sorted list of
unique `.parquet` files, finding the dataset root a file belongs to (where `metadata.json`
lives), opening each file's footer (schema-checked by `validation.py`), the flat list of
non-empty row groups every epoch is planned from, and the table sizes the roots' metadata
gives. Nothing here decodes data: all of it comes from directory listings and footers.

A path may also be a URI of an object store (`s3://bucket/prefix`, `gs://…`, `hdfs://…`): a
dataset prefix, a `day=N` prefix or one object, read through `pyarrow.fs` (ctrscale/storage.py)
— pyarrow's own clients, which read row-group ranges without fetching whole files. Globs are
local only.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ctrscale.data import schema
from ctrscale.data.loader.validation import check_file_schema
from ctrscale.errors import DataError
from ctrscale.storage import STORE_ERRORS, is_uri

_DAY_DIRECTORY = re.compile(r"day=\d+")


# ---------------------------------------------------------------------------------------------
# Paths


def _is_ignored(name: str) -> bool:
    """Hidden entries, `.tmp-*` writes in progress and `_SUCCESS`-style markers."""
    return name.startswith((".", "_"))


def _natural_key(path: PurePath | str) -> list[Any]:
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


@dataclass(frozen=True)
class DataFile:
    """A Parquet file where the loader found it: a filesystem and the path on it."""

    filesystem: pafs.FileSystem
    path: PurePath  # on `filesystem`: a local Path, or bucket/key of an object store
    scheme: str = ""  # "s3://" etc. for messages; "" for local files

    def __str__(self) -> str:
        return f"{self.scheme}{self.path}"

    def with_path(self, path: PurePath) -> DataFile:
        return DataFile(self.filesystem, path, self.scheme)

    def location(self) -> tuple[str, pafs.FileSystem | None]:
        """(path, filesystem) for readers that take both; no filesystem for local files."""
        return (str(self), None) if not self.scheme else (str(self.path), self.filesystem)


def _object_store_files(uri: str) -> list[DataFile]:
    """The `.parquet` objects a URI names: itself, or those under it as a prefix."""
    if glob.has_magic(uri.split("?")[0]):
        raise DataError(f"{uri}: globs are not supported in URIs; give a prefix or an object")
    try:
        filesystem, base = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(base)
    except STORE_ERRORS as exc:
        raise DataError(f"{uri}: cannot be opened ({exc})") from None
    scheme = uri.split("://")[0] + "://"
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: no such object or prefix")
    if info.type == pafs.FileType.File:
        return [DataFile(filesystem, PurePosixPath(base), scheme)]
    try:
        listing = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except STORE_ERRORS as exc:
        raise DataError(f"{uri}: cannot be listed ({exc})") from None
    found = [
        DataFile(filesystem, PurePosixPath(entry.path), scheme)
        for entry in listing
        if entry.type == pafs.FileType.File
        and entry.path.endswith(".parquet")
        and not any(_is_ignored(part) for part in PurePosixPath(entry.path).relative_to(base).parts)
    ]
    listed: dict[str, set[str] | None] = {}  # per dataset root, read once per listing
    found = [file for file in found if _listed_day(file, listed)]
    if not found:
        raise DataError(f"{uri}: no .parquet objects under this prefix")
    return found


def _listed_day(file: DataFile, listed: dict[str, set[str] | None]) -> bool:
    """Whether an object-store file's `day=N` is one its dataset's metadata.json lists (as
    `ctrscale prepare` writes it, ctrscale/data/prepare/store.py): a day whose upload has
    not finished, or one being replaced, is not listed yet and is skipped. Datasets whose
    metadata.json has no `days` (synth, other tools) are read whole."""
    day = next((p for p in reversed(file.path.parts) if _DAY_DIRECTORY.fullmatch(p)), None)
    if day is None:
        return True
    root = str(dataset_root(file.path))
    if root not in listed:
        try:
            with file.filesystem.open_input_stream(f"{root}/{schema.METADATA_FILE}") as f:
                days = json.loads(f.read()).get("days")
        except (FileNotFoundError, ValueError):
            days = None
        listed[root] = {f"day={d}" for d in days} if isinstance(days, dict) else None
    return listed[root] is None or day in listed[root]


def resolve_sources(paths: Iterable[str | os.PathLike[str]]) -> list[DataFile]:
    """`resolve_parquet_files` for local paths and object-store URIs alike."""
    paths = list(paths)
    local = [p for p in paths if not is_uri(p)]
    files = [
        DataFile(pafs.LocalFileSystem(), path)
        for path in (resolve_parquet_files(local) if local else [])
    ]
    remote = {str(f): f for uri in paths if is_uri(uri) for f in _object_store_files(str(uri))}
    files += [remote[name] for name in sorted(remote, key=_natural_key)]
    return files


def dataset_root(file: PurePath) -> PurePath:
    """The directory holding the `day=N` partitions (and metadata.json) a file belongs to."""
    for ancestor in file.parents:
        if _DAY_DIRECTORY.fullmatch(ancestor.name):
            return ancestor.parent
    return file.parent


# ---------------------------------------------------------------------------------------------
# Files and row groups


@dataclass(frozen=True)
class ParquetFile:
    source: DataFile
    file_id: str  # path relative to its dataset root: the holdout hash's stable file id
    metadata: pq.FileMetaData

    @property
    def path(self) -> str:
        """The file as the user named it (a local path or a URI), for messages."""
        return str(self.source)


@dataclass(frozen=True)
class RowGroup:
    file: int  # index into the loader's file list
    index: int  # row group index within the file
    first_row: int  # index in the file of the row group's first row
    num_rows: int


def open_files(files: list[DataFile], extras: Sequence[str]) -> list[ParquetFile]:
    """The files' footers, each checked against the schema (and the requested extra columns)."""
    opened = []
    for file in files:
        try:
            metadata = pq.read_metadata(str(file.path), filesystem=file.filesystem)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{file}: not a readable Parquet file ({exc})") from None
        check_file_schema(str(file), metadata, extras)
        file_id = file.path.relative_to(dataset_root(file.path)).as_posix()
        opened.append(ParquetFile(file, file_id, metadata))
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
    sizes_by_root: dict[str, dict[str, int]] = {}
    roots = {
        f"{f.source.scheme}{dataset_root(f.source.path)}": f.source.with_path(
            dataset_root(f.source.path)
        )
        for f in files
    }
    for name in sorted(roots):
        try:
            sizes_by_root[name] = schema.read_metadata(*roots[name].location())["table_sizes"]
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
