"""`ctrscale train` on several ranks checks that `--out` is one directory for all of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port

from ctrscale.distributed.context import child_environment

PROBE = Path(__file__).with_name("shared_dir_probe.py")


def run_probe(base: Path, layout: str) -> list[str]:
    subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), str(PROBE), str(base), layout,
        ],
        check=True, env=child_environment(), capture_output=True, timeout=300,
    )  # fmt: skip
    return [json.loads((base / f"rank-{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_a_shared_directory_passes_and_leaves_nothing_behind(tmp_path):
    assert run_probe(tmp_path, "shared") == ["ok", "ok"]
    assert not list(tmp_path.glob(".shared-directory-probe"))


@pytest.mark.slow
def test_node_local_directories_are_refused_on_every_rank_naming_the_blind_one(tmp_path):
    outcomes = run_probe(tmp_path, "node-local")
    for outcome in outcomes:
        assert "is not one shared directory: rank 1 on " in outcome
        assert "rank 0 on" not in outcome  # rank 0 sees its own write
