"""Publishing the refresh's models to an object store (`refresh.publish_uri`: s3://…, gs://…),
where there is no rename to make a publish atomic.

Layout under the URI U, mirroring the local registry's models (registry.py):

    U/models/<date>/…               the model's files (checkpoint/, config.toml, metrics.json)
    U/models/<date>/manifest.json   uploaded last: a model is complete iff it is present
    U/latest                        the date to serve, replaced by one PUT after the manifest

A reader takes `latest`, or any date whose manifest exists, and never sees a half-uploaded
model: until its manifest is there a date does not exist, and `latest` only ever names a date
whose manifest was uploaded before it. A publish killed at any point leaves the previous
`latest` in place; the next refresh (the local model is already published) uploads again —
every object is a plain PUT of the same bytes, so repeating one is harmless — and completes
it. `latest` never moves back: it is replaced only by a later date. The refresh lock
serialises publishers of one local registry; two registries publishing to one URI are not
supported (pyarrow.fs has no conditional writes to arbitrate between them).

Files go through `ctrscale.storage` (pyarrow.fs).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ctrscale.errors import CtrscaleError
from ctrscale.jobs.registry import LATEST, MANIFEST, MODELS, RegistryError, pause_if_requested
from ctrscale.storage import STORE_ERRORS, ObjectStore

log = logging.getLogger("ctrscale.refresh")


class RemoteRegistry:
    def __init__(self, uri: str) -> None:
        self.store = ObjectStore(uri, "refresh.publish_uri")

    def latest(self) -> str | None:
        return self.store.read_pointer(LATEST)

    def is_published(self, date: str) -> bool:
        return self.store.exists(MODELS, date, MANIFEST)

    def publish(self, date: str, model_dir: Path) -> str:
        """Upload the local model `model_dir` (complete: its manifest lists every file) as
        U/models/<date>, manifest last, then point `latest` at it if it is the newest."""
        target = self.store.name(MODELS, date)
        try:
            self._publish(date, model_dir, target)
        except STORE_ERRORS as exc:
            raise CtrscaleError(
                f"{target}: upload failed ({exc}); the local model is published, and the next "
                "refresh uploads it again"
            ) from None
        return target

    def _publish(self, date: str, model_dir: Path, target: str) -> None:
        manifest = json.loads((model_dir / MANIFEST).read_text())
        if not self.is_published(date):
            pause_if_requested("upload")
            for entry in manifest["files"]:
                self.store.upload(model_dir / entry["path"], MODELS, date, entry["path"])
            pause_if_requested("remote_manifest")
            self.store.upload(model_dir / MANIFEST, MODELS, date, MANIFEST)
            log.info("%s: uploaded to %s", date, target)
        pause_if_requested("remote_latest")
        latest = self.latest()
        if latest is None or latest < date:
            self.store.write_bytes(f"{date}\n".encode(), LATEST)
            log.info("%s = %s", self.store.name(LATEST), date)

    def verify(self, date: str) -> None:
        """Raise `RegistryError` unless U/models/<date> holds its manifest's files, byte for
        byte (sizes and sha256)."""
        text = self.store.read_bytes(MODELS, date, MANIFEST)
        if text is None:
            raise RegistryError(f"{self.store.name(MODELS, date)}: no {MANIFEST}")
        for entry in json.loads(text)["files"]:
            found = self.store.sha256(MODELS, date, entry["path"])
            name = self.store.name(MODELS, date, entry["path"])
            if found is None:
                raise RegistryError(f"{name}: missing")
            if found != (entry["bytes"], entry["sha256"]):
                raise RegistryError(f"{name}: size or sha256 differs from its {MANIFEST}")
