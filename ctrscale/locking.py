"""The one lock of ctrscale: an exclusive `flock` on a file, for a registry, a dataset being
prepared, or a training run's output directory.

Why `flock` and not an O_CREAT|O_EXCL lock file: the kernel drops a flock the moment its
holder dies — kill -9, OOM kill, a node lost (NFSv4 releases it when the client's lease
expires) — so a lock is never left behind, and taking over after a dead run needs no guessing
from pids (reused), hostnames (a new one per Kubernetes pod) or clocks, and has no
remove-then-recreate race between two newcomers. The file itself is never deleted (two
processes would otherwise lock two different inodes); it holds the holder's pid, host and
start time for the message a second process prints. Content left in it with no flock held is
the trace of a process that died, reported as a taken-over stale lock. The locked directory
must live on a filesystem with working locks (local disk, NFSv4, most CSI volumes).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ctrscale.errors import CtrscaleError, ExitCode


class LockHeld(CtrscaleError):
    """Another process holds the lock."""

    exit_code = ExitCode.LOCKED


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown process (it has not written its details yet)"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


class ExclusiveLock:
    """`with ExclusiveLock(path, "another `ctrscale refresh` is using this registry") as lock:`
    raises `LockHeld` at once when taken. `lock.stale` is the dead holder's details when its
    trace was found (and taken over)."""

    def __init__(self, path: str | Path, held_means: str) -> None:
        self.path = Path(path)
        self.held_means = held_means
        self.stale: dict[str, Any] | None = None
        self._handle = None

    def __enter__(self) -> ExclusiveLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # "a+" creates without truncating: the current holder's details must survive our open.
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(handle)
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise LockHeld(
                    f"{self.path} is held by {describe_holder(holder)}: {self.held_means}"
                ) from None
            raise CtrscaleError(
                f"{self.path}: cannot lock ({exc.strerror}); this needs a filesystem with "
                "working file locks"
            ) from None
        self.stale = _read_holder(handle)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        handle.truncate(0)
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        # Emptied before unlocking: content without a flock means "a holder died with it".
        self._handle.truncate(0)
        self._handle.flush()
        self._handle.close()  # closing releases the flock
        self._handle = None


def _read_holder(handle) -> dict[str, Any] | None:
    handle.seek(0)
    text = handle.read().strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "started": f"? (unreadable: {text[:80]!r})"}
