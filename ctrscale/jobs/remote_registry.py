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

Files go through `pyarrow.fs` (pyarrow's S3/GCS/HDFS clients; credentials and endpoints from
the environment, e.g. AWS_ENDPOINT_URL, or the URI's query), in 8 MiB chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from ctrscale.errors import CtrscaleError
from ctrscale.jobs.registry import LATEST, MANIFEST, MODELS, RegistryError, pause_if_requested

CHUNK = 8 << 20

log = logging.getLogger("ctrscale.refresh")


class RemoteRegistry:
    def __init__(self, uri: str) -> None:
        self.uri = uri.split("?")[0].rstrip("/")
        try:
            self.filesystem, base = pafs.FileSystem.from_uri(uri)
        except (OSError, pa.ArrowException) as exc:
            raise CtrscaleError(f"refresh.publish_uri={uri!r}: cannot be opened ({exc})") from None
        self.base = base.rstrip("/")

    def _path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _read_text(self, *parts: str) -> str | None:
        try:
            with self.filesystem.open_input_stream(self._path(*parts)) as stream:
                return stream.read().decode()
        except FileNotFoundError:
            return None

    def latest(self) -> str | None:
        text = self._read_text(LATEST)
        return text.strip() or None if text is not None else None

    def is_published(self, date: str) -> bool:
        info = self.filesystem.get_file_info(self._path(MODELS, date, MANIFEST))
        return info.type == pafs.FileType.File

    def publish(self, date: str, model_dir: Path) -> str:
        """Upload the local model `model_dir` (complete: its manifest lists every file) as
        U/models/<date>, manifest last, then point `latest` at it if it is the newest."""
        target = f"{self.uri}/{MODELS}/{date}"
        try:
            self._publish(date, model_dir, target)
        except (OSError, pa.ArrowException) as exc:
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
                self._upload(model_dir / entry["path"], MODELS, date, entry["path"])
            pause_if_requested("remote_manifest")
            self._upload(model_dir / MANIFEST, MODELS, date, MANIFEST)
            log.info("%s: uploaded to %s", date, target)
        pause_if_requested("remote_latest")
        latest = self.latest()
        if latest is None or latest < date:
            self._write(date + "\n", LATEST)
            log.info("%s/%s = %s", self.uri, LATEST, date)

    def verify(self, date: str) -> None:
        """Raise `RegistryError` unless U/models/<date> holds its manifest's files, byte for
        byte (sizes and sha256)."""
        text = self._read_text(MODELS, date, MANIFEST)
        if text is None:
            raise RegistryError(f"{self.uri}/{MODELS}/{date}: no {MANIFEST}")
        for entry in json.loads(text)["files"]:
            path = self._path(MODELS, date, entry["path"])
            digest, size = hashlib.sha256(), 0
            try:
                with self.filesystem.open_input_stream(path) as stream:
                    while chunk := stream.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                raise RegistryError(
                    f"{self.uri}/{MODELS}/{date}/{entry['path']}: missing"
                ) from None
            if size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
                raise RegistryError(
                    f"{self.uri}/{MODELS}/{date}/{entry['path']}: size or sha256 differs from "
                    f"its {MANIFEST}"
                )

    def _open_for_writing(self, *parts: str):
        path = self._path(*parts)
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            # A file:// target (e.g. a mounted bucket) needs its directories; object stores
            # have none, and creating one there would add a marker object per prefix.
            self.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return self.filesystem.open_output_stream(path)

    def _upload(self, source: Path, *parts: str) -> None:
        with open(source, "rb") as local, self._open_for_writing(*parts) as remote:
            while chunk := local.read(CHUNK):
                remote.write(chunk)

    def _write(self, text: str, *parts: str) -> None:
        with self._open_for_writing(*parts) as remote:
            remote.write(text.encode())
