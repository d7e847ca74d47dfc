"""CowClip and L2 on TorchRec-sharded tables equal the paper's formula applied to the dense
gradient of an unsharded model — in one process and in two (table-wise and column-wise
shards), after several steps with heavily repeated ids; under lazy semantics (rows of the
batch) and dense semantics (every row, the official code's)."""

import json
import subprocess
import sys

import pytest
from optim import cowclip_reference
from support import REPO_ROOT, free_port

from ctrscale.distributed.context import child_environment


def check(result: dict, sharding: str) -> None:
    assert result["max_relative_error"] <= 1e-5
    # The comparison means something only if the clip both bit and let ids through.
    assert result["clipped_ids"] > 0
    assert result["unclipped_ids"] > 0
    # The clipped fraction the trainer logs is the literal one (an id of a column-split table
    # is counted on each shard of its row, of a replicated table on each rank).
    seen = result["clipped_ids"] + result["unclipped_ids"]
    fraction = result["counted_clipped"] / result["counted_seen"]
    assert fraction == pytest.approx(result["clipped_ids"] / seen, rel=1e-12)
    if sharding == "table_wise":
        assert (result["counted_clipped"], result["counted_seen"]) == (result["clipped_ids"], seen)


SHARDINGS = ["table_wise", "column_wise", "data_parallel"]


@pytest.mark.parametrize("semantics", ["lazy", "dense"])
@pytest.mark.parametrize("embedding_optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_one_process_matches_the_formula(
    single_process_group, sharding, embedding_optimizer, semantics
):
    check(cowclip_reference.run(sharding, embedding_optimizer, semantics), sharding)


TWO_PROCESS_CASES = [
    *((sharding, optimizer, "lazy") for sharding in SHARDINGS for optimizer in ("sgd", "adam")),
    ("table_wise", "adam", "dense"),
    ("column_wise", "adam", "dense"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("sharding", "embedding_optimizer", "semantics"), TWO_PROCESS_CASES)
def test_two_processes_match_the_formula(tmp_path, sharding, embedding_optimizer, semantics):
    out = tmp_path / "result.json"
    env = child_environment()
    env["PYTHONPATH"] = f"{REPO_ROOT / 'tests'}"
    subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()),
            str(REPO_ROOT / "tests" / "optim" / "cowclip_reference.py"), sharding,
            embedding_optimizer, semantics, str(out),
        ],
        check=True, env=env, capture_output=True, timeout=600,
    )  # fmt: skip
    check(json.loads(out.read_text()), sharding)
