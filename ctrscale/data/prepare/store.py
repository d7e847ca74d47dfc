"""`ctrscale prepare --out s3://…`: the prepare job onto a dataset in an object store.

An object store has no rename, so a day cannot appear at once the way `publish_dir` makes it
appear on disk. Instead the dataset's `metadata.json` is what says which days exist: readers
of an object store (`loader/dataset.py`) read only the `day=N` prefixes that metadata.json
lists, and this module uploads in this order:

1. a day to replace (`--overwrite`) is first dropped from metadata.json, then deleted;
2. each new day's Parquet files, then its `_manifest.json`;
3. the `_vocab/` tables of a new `--ids vocab` dataset;
4. metadata.json, now listing the new days — the one PUT that makes them visible;
5. summary.json.

A run killed anywhere leaves the dataset as it was before it, plus unlisted objects that the
next run of the same days replaces. The conversion itself is `prepare_files` unchanged, into
a local staging copy that holds the store's metadata.json and vocabulary, so days added to an
existing dataset keep its encoding. There is no lock on an object store: run one prepare per
dataset at a time (the refresh's lock does that for its own dataset).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from ctrscale.data import schema
from ctrscale.data.prepare.job import SUMMARY_FILE, assign_days, prepare_files
from ctrscale.data.prepare.vocab import VOCAB_DIR
from ctrscale.data.prepare.writer import MANIFEST_FILE
from ctrscale.errors import CtrscaleError


class ObjectStoreDataset:
    def __init__(self, uri: str) -> None:
        self.uri = uri.split("?")[0].rstrip("/")
        try:
            self.filesystem, base = pafs.FileSystem.from_uri(uri)
        except (OSError, pa.ArrowException) as exc:
            raise CtrscaleError(f"--out {uri}: cannot be opened ({exc})") from None
        self.base = base.rstrip("/")

    def metadata(self) -> dict[str, Any] | None:
        try:
            with self.filesystem.open_input_stream(f"{self.base}/{schema.METADATA_FILE}") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def download(self, name: str, staging: Path) -> None:
        """`name` (a file or a prefix) into `staging`, if the store has it."""
        info = self.filesystem.get_file_info(f"{self.base}/{name}")
        if info.type == pafs.FileType.NotFound:
            return
        if info.type == pafs.FileType.Directory:
            (staging / name).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            f"{self.base}/{name}",
            str(staging / name),
            source_filesystem=self.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )

    def upload(self, staging: Path, name: str) -> None:
        path = f"{self.base}/{name}"
        with open(staging / name, "rb") as local, self.filesystem.open_output_stream(path) as out:
            while chunk := local.read(8 << 20):
                out.write(chunk)

    def write_metadata(self, meta: dict[str, Any]) -> None:
        with self.filesystem.open_output_stream(f"{self.base}/{schema.METADATA_FILE}") as out:
            out.write(json.dumps(meta, indent=2).encode())

    def delete_day(self, day: int) -> None:
        prefix = f"{self.base}/day={day}"
        if self.filesystem.get_file_info(prefix).type != pafs.FileType.NotFound:
            self.filesystem.delete_dir(prefix)


def prepare_to_store(inputs: list[Path], uri: str, **options: Any) -> dict[str, Any]:
    """`prepare_files` onto the object-store dataset at `uri` (see the module docstring)."""
    store = ObjectStoreDataset(uri)
    try:
        return _prepare(store, inputs, options)
    except (OSError, pa.ArrowException) as exc:
        raise CtrscaleError(
            f"{store.uri}: object store error ({exc}); the days listed in its metadata.json "
            "are as they were, rerun to finish"
        ) from None


def _prepare(store: ObjectStoreDataset, inputs: list[Path], options: dict[str, Any]):
    meta = store.metadata()
    days = assign_days(inputs, options.pop("days", None))
    with tempfile.TemporaryDirectory(prefix="ctrscale-prepare-") as staging_dir:
        staging = Path(staging_dir)
        if meta is not None:
            store.download(schema.METADATA_FILE, staging)
            store.download(VOCAB_DIR, staging)
            taken = [day for day in days if str(day) in meta.get("days", {})]
            if taken and not options.get("overwrite"):
                raise CtrscaleError(
                    f"{store.uri}: {', '.join(f'day={day}' for day in taken)} already exist; "
                    "pass --overwrite to replace"
                )
            if taken:
                # Readers stop seeing these days before any of their objects change.
                meta["days"] = {k: v for k, v in meta["days"].items() if int(k) not in taken}
                store.write_metadata(meta)
                (staging / schema.METADATA_FILE).write_text(json.dumps(meta))
        summary = prepare_files(inputs, staging, days=days, **options)
        for day in days:
            store.delete_day(day)  # an old version, or objects a killed run left unlisted
            files = json.loads((staging / f"day={day}" / MANIFEST_FILE).read_text())["files"]
            for entry in files:
                store.upload(staging, f"day={day}/{entry['path']}")
            store.upload(staging, f"day={day}/{MANIFEST_FILE}")
        if meta is None and (staging / VOCAB_DIR).is_dir():
            for table in sorted((staging / VOCAB_DIR).iterdir()):
                store.upload(staging, f"{VOCAB_DIR}/{table.name}")
        store.upload(staging, schema.METADATA_FILE)  # the new days become visible here
        summary["out"] = store.uri
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        store.upload(staging, SUMMARY_FILE)
        return summary
