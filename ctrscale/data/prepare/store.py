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

from ctrscale.data import schema
from ctrscale.data.prepare.job import SUMMARY_FILE, assign_days, prepare_files
from ctrscale.data.prepare.vocab import VOCAB_DIR
from ctrscale.data.prepare.writer import MANIFEST_FILE
from ctrscale.errors import CtrscaleError
from ctrscale.storage import STORE_ERRORS, ObjectStore


def prepare_to_store(inputs: list[Path], uri: str, **options: Any) -> dict[str, Any]:
    """`prepare_files` onto the object-store dataset at `uri` (see the module docstring)."""
    store = ObjectStore(uri, "--out")
    try:
        return _prepare(store, inputs, options)
    except STORE_ERRORS as exc:
        raise CtrscaleError(
            f"{store.uri}: object store error ({exc}); the days listed in its metadata.json "
            "are as they were, rerun to finish"
        ) from None


def _stored_metadata(store: ObjectStore) -> dict[str, Any] | None:
    text = store.read_bytes(schema.METADATA_FILE)
    return None if text is None else json.loads(text)


def _prepare(store: ObjectStore, inputs: list[Path], options: dict[str, Any]):
    meta = _stored_metadata(store)
    days = assign_days(inputs, options.pop("days", None))
    with tempfile.TemporaryDirectory(prefix="ctrscale-prepare-") as staging_dir:
        staging = Path(staging_dir)
        if meta is not None:
            store.download(staging / schema.METADATA_FILE, schema.METADATA_FILE)
            store.download(staging / VOCAB_DIR, VOCAB_DIR)
            taken = [day for day in days if str(day) in meta.get("days", {})]
            if taken and not options.get("overwrite"):
                raise CtrscaleError(
                    f"{store.uri}: {', '.join(f'day={day}' for day in taken)} already exist; "
                    "pass --overwrite to replace"
                )
            if taken:
                meta["days"] = {k: v for k, v in meta["days"].items() if int(k) not in taken}
                (staging / schema.METADATA_FILE).write_text(json.dumps(meta, indent=2))
        summary = prepare_files(inputs, staging, days=days, **options)
        if meta is not None and taken:
            # Readers stop seeing the replaced days before any of their objects change, and
            # only now: a conversion that fails leaves the store's listing as it was.
            store.write_bytes(json.dumps(meta, indent=2).encode(), schema.METADATA_FILE)
        for day in days:
            store.delete_prefix(f"day={day}")  # an old version, or a killed run's objects
            files = json.loads((staging / f"day={day}" / MANIFEST_FILE).read_text())["files"]
            for name in [*(entry["path"] for entry in files), MANIFEST_FILE]:
                store.upload(staging / f"day={day}" / name, f"day={day}", name)
        if meta is None and (staging / VOCAB_DIR).is_dir():
            for table in sorted((staging / VOCAB_DIR).iterdir()):
                store.upload(table, VOCAB_DIR, table.name)
        # The new days become visible here.
        store.upload(staging / schema.METADATA_FILE, schema.METADATA_FILE)
        summary["out"] = store.uri
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        store.upload(staging / SUMMARY_FILE, SUMMARY_FILE)
        return summary
