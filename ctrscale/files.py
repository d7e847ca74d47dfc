"""Durable, atomic writes: the one place where ctrscale replaces a file or publishes a
directory, so that a reader (or a run after a crash) sees the old version or the complete new
one, never a mix, and a completed rename survives a power loss.

A file is written to a hidden temp name in its own directory (a rename is atomic only within
a filesystem), flushed to disk, renamed over the target, and the directory entry flushed too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ctrscale.errors import CtrscaleError


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (also inside dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(item) for item in value]
    return value


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """`payload` as indented JSON with sorted keys."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def publish_dir(staging: str | Path, final: str | Path) -> None:
    """Rename a finished `staging` directory to `final`, replacing an existing one: the old
    one is renamed aside first and deleted after the new one is in place."""
    staging, final = Path(staging), Path(final)
    fsync_path(staging)
    aside = None
    if final.exists():
        aside = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, aside)
    os.rename(staging, final)
    fsync_path(final.parent)
    if aside is not None:
        shutil.rmtree(aside)


def usable_directory(path: Path, name: str) -> None:
    """Create `path` if needed; a file in the way, a directory that cannot be made or is not
    writable is a one-line error naming `name` (the option or key that gave it)."""
    if path.exists() and not path.is_dir():
        raise CtrscaleError(f"{name} {path}: a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CtrscaleError(f"{name} {path}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CtrscaleError(f"{name} {path}: not writable by this user")
