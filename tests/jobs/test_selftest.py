"""`ctrscale selftest`: the installation check passes where ctrscale works, and fails (exit
code 1, the failing check named) where the model does not learn."""

from __future__ import annotations

import json

import pytest
from runner import run_ctrscale


def _report(done) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_selftest_passes_on_a_working_installation_under_torchrun(tmp_path):
    done = run_ctrscale(["selftest", "--dir", str(tmp_path / "selftest")], nproc=2)
    report = _report(done)
    assert report["passed"] and all(report["checks"].values()), report
    assert report["world_size"] == 2 and report["device"] == "cpu"
    assert report["embedding_update"]["cowclip"]["mode"] == "paper"


@pytest.mark.slow
def test_selftest_fails_with_exit_code_1_when_nothing_learns(tmp_path):
    """One process (the common case); the checks that do pass still pass."""
    args = ["selftest", "--dir", str(tmp_path / "selftest")]
    args += ["--set", "optim.embedding.lr=1e-9", "--set", "optim.dense.lr=1e-9"]
    done = run_ctrscale(args, check=False)
    assert done.returncode == 1
    report = _report(done)
    assert not report["passed"] and report["checks"]["learns"] is False
    assert report["checks"]["resume_matches"] and report["checks"]["checkpoint_round_trip"]
