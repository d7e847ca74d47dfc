"""A run's checkpoints copied to an object store (`train.checkpoint_uri`), so that a run whose
machine is gone — a preempted spot instance, a rescheduled pod with an empty disk — resumes
from the store.

Checkpoints are still written and verified locally first (checkpoint.py); the main rank then
uploads each complete one under U/step-N/, its `state.json` last (a step whose state.json is
missing is incomplete, as on disk), then replaces U/latest, then deletes the store's older
checkpoints beyond the two newest. `--resume` without a local checkpoint downloads U/latest's
checkpoint into the run's `checkpoints/` first (into a hidden directory renamed into place),
and then resumes from it as from any local checkpoint: verified against its manifest.
`fetch_checkpoint` brings one from a store for a warm start or `evaluate`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ctrscale.errors import CtrscaleError
from ctrscale.files import publish_dir, write_text_atomic
from ctrscale.storage import STORE_ERRORS, ObjectStore
from ctrscale.train.checkpoint import LATEST, STATE_FILE

KEEP = 2  # checkpoints kept in the store, as on disk (save_checkpoint's `keep`)


class CheckpointMirror:
    def __init__(self, uri: str) -> None:
        self.store = ObjectStore(uri, "train.checkpoint_uri")

    def latest(self) -> str | None:
        """The name (step-N) of the store's newest complete checkpoint."""
        return self._call(self.store.read_pointer, LATEST)

    def read_bytes(self, *parts: str) -> bytes | None:
        return self._call(self.store.read_bytes, *parts)

    def upload(self, checkpoint: Path) -> None:
        files = sorted(p for p in checkpoint.iterdir() if p.is_file() and p.name != STATE_FILE)
        for file in [*files, checkpoint / STATE_FILE]:
            self._call(self.store.upload, file, checkpoint.name, file.name)
        self._call(self.store.write_bytes, f"{checkpoint.name}\n".encode(), LATEST)
        self._prune(current=checkpoint.name)

    def download_latest(self, directory: Path) -> str | None:
        """The store's latest checkpoint into `directory` (and its local `latest`); None
        when the store has none."""
        name = self.latest()
        if name is None:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        # Named as save_checkpoint names its staging, so its pruning removes a failed download's.
        staging = directory / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        self._call(self.store.download, staging, name)
        if not (staging / STATE_FILE).exists():
            raise CtrscaleError(f"{self.store.name(name)}: incomplete (no {STATE_FILE})")
        publish_dir(staging, directory / name)
        write_text_atomic(directory / LATEST, f"{name}\n")
        return name

    def _prune(self, current: str) -> None:
        listing = self._call(self.store.list_names)
        complete = sorted(n for n in listing if n.startswith("step-"))
        for old in complete[:-KEEP]:
            if old != current:
                self._call(self.store.delete_prefix, old)

    def _call(self, function, *args):
        try:
            return function(*args)
        except STORE_ERRORS as exc:
            raise CtrscaleError(f"train.checkpoint_uri {self.store.uri}: {exc}") from None


def fetch_checkpoint(uri: str, into: Path) -> Path:
    """A checkpoint in an object store downloaded into `into`/checkpoint: a `step-N` prefix, a
    run's `train.checkpoint_uri` (its latest), or a model the refresh published there
    (`refresh.publish_uri`/models/<date>, whose checkpoint/ it is). Verified when loaded."""
    store = ObjectStore(uri, "checkpoint")
    try:
        if store.exists(STATE_FILE):
            source: tuple[str, ...] = ()
        elif store.exists("checkpoint", STATE_FILE):
            source = ("checkpoint",)
        elif (latest := store.read_pointer(LATEST)) is not None:
            source = (latest,)
        else:
            raise CtrscaleError(
                f"{uri}: not a checkpoint (no {STATE_FILE}), a published model (no "
                f"checkpoint/{STATE_FILE}) nor a run's checkpoints (no {LATEST})"
            )
        target = into / "checkpoint"
        shutil.rmtree(target, ignore_errors=True)
        store.download(target, *source)
    except STORE_ERRORS as exc:
        raise CtrscaleError(f"{uri}: {exc}") from None
    return target
