"""Several nodes: two torchrun launchers — two "nodes" of one process each on this host,
meeting through a c10d rendezvous on localhost, as `torchrun --nnodes 2` does across machines
— train and evaluate like one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from runner import metrics, run_ctrscale, tiny_overrides, train_args
from support import free_port

from ctrscale.distributed.context import child_environment


def on_two_nodes(args: list[str]) -> list[subprocess.CompletedProcess]:
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "ctrscale-test",
        "-m", "ctrscale", *args,
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            launcher,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_environment(),
        )
        for _ in range(2)
    ]
    done = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-4000:]
        done.append(subprocess.CompletedProcess(launcher, node.returncode, stdout, stderr))
    return done


@pytest.mark.slow
def test_two_nodes_train_and_evaluate_like_one_process(tiny_dataset, tmp_path):
    overrides = tiny_overrides(
        tiny_dataset, **{"train.max_steps": 4, "optim.embedding.name": "sgd"}
    )
    run_ctrscale(train_args(tmp_path / "one", overrides))
    on_two_nodes(train_args(tmp_path / "two", overrides))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 4
    assert two["auc"] == pytest.approx(one["auc"], rel=1e-5)
    assert two["logloss"] == pytest.approx(one["logloss"], rel=1e-5)

    outputs = on_two_nodes(["evaluate", "--checkpoint", str(tmp_path / "two")])
    lines = [o.stdout.strip().splitlines() for o in outputs]
    evaluated = json.loads(next(line[-1] for line in lines if line))  # rank 0's node prints
    assert evaluated["auc"] == pytest.approx(two["auc"], abs=1e-12)
