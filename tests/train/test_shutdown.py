"""Leaving a process group behind: its worker threads must be gone before Python finalizes."""

from __future__ import annotations

import subprocess
import sys

from support import free_port

from ctrscale.distributed.context import child_environment

# A trainer (sharded model, optimizers: objects in reference cycles that hold the group) is
# built and dropped; then the group's gloo worker threads are counted before and after.
SCRIPT = """
import os
from pathlib import Path
from ctrscale.config import load_config
from ctrscale.distributed.context import init_distributed, shutdown_distributed
from ctrscale.train.step import build_trainer

def gloo_threads():
    tasks = Path("/proc/self/task").iterdir()
    return sum((task / "comm").read_text().startswith("pt_gloo") for task in tasks)

config = load_config(None, ["model.dnn=[8]", "data.batch_size=64"])
ctx = init_distributed(config.distributed)
tables = {f"C{i}": 10 for i in range(1, 27)}
build_trainer(config, ctx, tables, steps_per_epoch=2, total_steps=2)
print(gloo_threads())
shutdown_distributed()
print(gloo_threads())
"""


def test_shutdown_joins_the_gloo_threads_that_a_dropped_trainer_still_held():
    env = {
        **child_environment(),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True
    )
    before, after = (int(line) for line in done.stdout.split())
    assert before > 0  # the group's threads outlive the trainer object that used them
    assert after == 0
