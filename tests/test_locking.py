"""The one lock: fails fast naming its holder, leaves no trace when released, and takes over
the trace of a holder that died."""

import json
import os

import pytest

from ctrscale.errors import ExitCode
from ctrscale.locking import ExclusiveLock, LockHeld


def test_a_held_lock_fails_fast_and_names_its_holder_and_what_it_means(tmp_path):
    path = tmp_path / ".lock"
    with ExclusiveLock(path, "another job uses this") as held:
        assert held.stale is None
        with pytest.raises(LockHeld, match=f"pid {os.getpid()} on host .*another job uses this"):
            ExclusiveLock(path, "another job uses this").__enter__()
    assert path.read_text() == ""  # released cleanly: no trace left
    assert LockHeld.exit_code == ExitCode.LOCKED


def test_a_stale_lock_is_taken_over(tmp_path):
    path = tmp_path / ".lock"
    dead = {"pid": 999_999_999, "host": "gone", "started": "2024-01-01T00:00:00+00:00"}
    path.write_text(json.dumps(dead))  # a killed holder's trace, no flock held
    with ExclusiveLock(path, "x") as lock:
        assert lock.stale == dead
        assert json.loads(path.read_text())["pid"] == os.getpid()
