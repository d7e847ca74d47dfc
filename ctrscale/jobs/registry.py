"""The model registry the daily refresh publishes into, and how it stays consistent.

Layout of a registry directory R (dates are YYYY-MM-DD):

    R/models/<date>/        a published model; complete iff manifest.json is present
        checkpoint/         the DCP checkpoint (model + optimizer state; loads at any world size)
        config.toml         the full config it was trained with
        metrics.json        gate slice results of candidate and previous model, the decision,
                            training metrics, the days and dataset encoding it was trained on
        manifest.json       written last: every other file with its size and sha256
    R/latest                the date of the model to serve and warm-start from (atomic replace)
    R/publishing            journal of a publish in progress: the date being published
    R/rejected/<date>/      metrics.json + config.toml of a candidate the gate turned down
    R / work / <date>       the date's training run; a rerun after a crash resumes from it
    R/.lock                 the refresh lock (ctrscale/locking.py)

Publishing is crash-safe: the model is assembled in a hidden `models/.tmp-<date>-…` directory,
renamed to `models/<date>` (atomic), then `latest` is replaced (atomic). `publishing` records
the date first, so `recover()` can tell an interrupted publish (finish it: point `latest` at
the renamed model) from a deliberate rollback of `latest` (leave it).

`CTRSCALE_TEST_PAUSE_BEFORE=publish|rename|latest` (and `upload|remote_manifest|remote_latest`
of remote_registry.py) makes a refresh sleep at that point so a test can kill -9 it there
deterministically; nothing else reads it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ctrscale.config import Config, save_config
from ctrscale.data.schema import sha256_file
from ctrscale.errors import CtrscaleError
from ctrscale.files import fsync_path, write_json_atomic, write_text_atomic

MODELS = "models"
LATEST = "latest"
JOURNAL = "publishing"
REJECTED = "rejected"
WORK = "work"
MANIFEST = "manifest.json"
METRICS = "metrics.json"
CONFIG = "config.toml"
CHECKPOINT = "checkpoint"
STAGING_PREFIX = ".tmp-"
PAUSE_VARIABLE = "CTRSCALE_TEST_PAUSE_BEFORE"

log = logging.getLogger("ctrscale.refresh")


class RegistryError(CtrscaleError):
    """A registry entry that is not what its manifest says."""


def _link_or_copy(source: str, target: str) -> None:
    # The work dir sits in the registry, so a hard link publishes a multi-GB checkpoint without
    # copying it; checkpoints are never modified in place, and the work dir is deleted next.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def pause_if_requested(point: str) -> None:
    """The test hook: sleep here (to be killed) when CTRSCALE_TEST_PAUSE_BEFORE=point."""
    if os.environ.get(PAUSE_VARIABLE) == point:
        log.warning("%s=%s: pausing here until killed (test hook)", PAUSE_VARIABLE, point)
        while True:
            time.sleep(60)


class Registry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # --- where things are ----------------------------------------------------------------

    def model_dir(self, date: str) -> Path:
        return self.root / MODELS / date

    def checkpoint(self, date: str) -> Path:
        return self.model_dir(date) / CHECKPOINT

    def work_dir(self, date: str) -> Path:
        return self.root / WORK / date

    def rejected_dir(self, date: str) -> Path:
        return self.root / REJECTED / date

    # --- reading -------------------------------------------------------------------------

    def latest(self) -> str | None:
        try:
            return (self.root / LATEST).read_text().strip() or None
        except FileNotFoundError:
            return None

    def is_published(self, date: str) -> bool:
        return (self.model_dir(date) / MANIFEST).is_file()

    def published_dates(self) -> list[str]:
        models = self.root / MODELS
        if not models.is_dir():
            return []
        return sorted(
            entry.name
            for entry in models.iterdir()
            if not entry.name.startswith(".") and (entry / MANIFEST).is_file()
        )

    def metrics(self, date: str) -> dict[str, Any]:
        return json.loads((self.model_dir(date) / METRICS).read_text())

    def verify(self, date: str) -> None:
        """Raise `RegistryError` unless models/<date> holds exactly its manifest's files."""
        directory = self.model_dir(date)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{directory}: no readable {MANIFEST} ({exc})") from None
        listed = {entry["path"]: entry for entry in manifest["files"]}
        present = {
            str(path.relative_to(directory))
            for path in directory.rglob("*")
            if path.is_file() and path != directory / MANIFEST
        }
        if present != set(listed):
            raise RegistryError(
                f"{directory}: files differ from its manifest (missing "
                f"{sorted(set(listed) - present)}, unlisted {sorted(present - set(listed))})"
            )
        for name, entry in listed.items():
            path = directory / name
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise RegistryError(f"{path}: size or sha256 differs from {directory / MANIFEST}")

    # --- writing (the caller holds the registry lock) --------------------------------------

    def recover(self) -> None:
        """Clean up after a run that died: staging dirs, a half-done publish, stale work dirs."""
        for staging in (self.root / MODELS).glob(f"{STAGING_PREFIX}*"):
            log.info("removing %s, left by an interrupted publish", staging)
            shutil.rmtree(staging)
        journal = self.root / JOURNAL
        if journal.exists():
            date = journal.read_text().strip()
            if self.is_published(date) and self.latest() != date:
                log.info("finishing the interrupted publish of %s: pointing latest at it", date)
                write_text_atomic(self.root / LATEST, date + "\n")
            journal.unlink()
        for work in (self.root / WORK).glob("*"):
            if self.is_published(work.name):
                shutil.rmtree(work)

    def publish(
        self, date: str, checkpoint: Path, config_file: Path, metrics: dict[str, Any]
    ) -> Path:
        """Copy the candidate into models/<date>, then make it `latest`; crash-safe."""
        pause_if_requested("publish")
        final = self.model_dir(date)
        if final.exists():
            raise RegistryError(f"{final} already exists; a published model is never replaced")
        final.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.root / JOURNAL, date + "\n")
        staging = final.parent / f"{STAGING_PREFIX}{date}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        shutil.copytree(checkpoint, staging / CHECKPOINT, copy_function=_link_or_copy)
        shutil.copy2(config_file, staging / CONFIG)
        write_json_atomic(staging / METRICS, metrics)
        files = []
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            fsync_path(path)
            files.append(
                {
                    "path": str(path.relative_to(staging)),
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                }
            )
        created = datetime.now(UTC).isoformat(timespec="seconds")
        write_json_atomic(staging / MANIFEST, {"date": date, "created": created, "files": files})
        for directory in [*(p for p in staging.rglob("*") if p.is_dir()), staging]:
            fsync_path(directory)
        pause_if_requested("rename")
        staging.rename(final)
        fsync_path(final.parent)
        pause_if_requested("latest")
        write_text_atomic(self.root / LATEST, date + "\n")
        (self.root / JOURNAL).unlink()
        shutil.rmtree(self.rejected_dir(date), ignore_errors=True)  # superseded by this model
        return final

    def reject(self, date: str, config: Config, metrics: dict[str, Any]) -> Path:
        """Record a candidate the gate turned down; `latest` and models/ stay as they are."""
        directory = self.rejected_dir(date)
        directory.mkdir(parents=True, exist_ok=True)
        save_config(config, directory / CONFIG)
        write_json_atomic(directory / METRICS, metrics)
        return directory
