"""Object stores (s3://, gs://, hdfs://, …) through `pyarrow.fs`: the one place that opens a
URI and moves whole files to and from it.

pyarrow's own clients read and write without fsspec; credentials and endpoints come from the
environment as for any client of that store (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL for an
S3-compatible store such as MinIO, …) or from the URI's query
(`?endpoint_override=host:port&scheme=http`). There is no rename on an object store, so the
callers make a publish atomic by writing the one object that makes it visible last.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from ctrscale.errors import CtrscaleError
from ctrscale.files import write_bytes_atomic

CHUNK = 8 << 20  # bytes per read/write when moving whole files

# What a store raises when it cannot be reached or refuses a request.
STORE_ERRORS = (OSError, pa.ArrowException)


def is_uri(path: str | os.PathLike[str]) -> bool:
    """`scheme://…`: read and written through pyarrow.fs like any store, `file://` included
    (a mounted bucket is then handled as its object store would be)."""
    return "://" in os.fspath(path)


class ObjectStore:
    """A prefix of an object store: `store.path("a", "b")` is U/a/b on its filesystem."""

    def __init__(self, uri: str, what: str) -> None:
        self.uri = uri.split("?")[0].rstrip("/")
        try:
            self.filesystem, base = pafs.FileSystem.from_uri(uri)
        except STORE_ERRORS as exc:
            raise CtrscaleError(f"{what}={uri!r}: cannot be opened ({exc})") from None
        self.base = base.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def name(self, *parts: str) -> str:
        """U/a/b as the user wrote U, for messages."""
        return "/".join([self.uri, *parts])

    def exists(self, *parts: str) -> bool:
        return self.filesystem.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_bytes(self, *parts: str) -> bytes | None:
        """The object's bytes; None when there is no such object."""
        try:
            with self.filesystem.open_input_stream(self.path(*parts)) as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def read_pointer(self, *parts: str) -> str | None:
        """The name a pointer object (`latest`) holds; None when it is missing or empty."""
        data = self.read_bytes(*parts)
        return (data.decode().strip() or None) if data is not None else None

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """A whole object: readers see the old bytes or the new ones, never a part (an object
        store's PUT is atomic; a local file is written aside and renamed over)."""
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            Path(self.path(*parts)).parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.path(*parts), data)
            return
        with self._open_for_writing(*parts) as out:
            out.write(data)

    def upload(self, source: Path, *parts: str) -> None:
        with open(source, "rb") as local, self._open_for_writing(*parts) as out:
            while chunk := local.read(CHUNK):
                out.write(chunk)

    def download(self, target: Path, *parts: str) -> bool:
        """The object or prefix U/parts into `target`; False when there is none."""
        info = self.filesystem.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.NotFound:
            return False
        if info.type == pafs.FileType.Directory:
            target.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            self.path(*parts),
            str(target),
            source_filesystem=self.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        return True

    def sha256(self, *parts: str) -> tuple[int, str] | None:
        """(size, sha256 hex) of the object, streamed; None when there is no such object."""
        digest, size = hashlib.sha256(), 0
        try:
            with self.filesystem.open_input_stream(self.path(*parts)) as stream:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            return None
        return size, digest.hexdigest()

    def list_names(self, *parts: str) -> list[str]:
        """The names of the objects and prefixes directly under U/parts."""
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(info.base_name for info in self.filesystem.get_file_info(selector))

    def delete_prefix(self, *parts: str) -> None:
        if self.exists(*parts):
            self.filesystem.delete_dir(self.path(*parts))

    def _open_for_writing(self, *parts: str):
        path = self.path(*parts)
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            # A file:// target (e.g. a mounted bucket) needs its directories; object stores
            # have none, and creating one there would add a marker object per prefix.
            self.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return self.filesystem.open_output_stream(path)
