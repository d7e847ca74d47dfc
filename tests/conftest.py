"""Shared fixtures: a world-size-1 gloo process group, the real Criteo sample rows and a small
synthetic dataset for training tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import CRITEO_SAMPLE, free_port

from ctrscale.runtime import tune_process

# As the `ctrscale` entry point does: before any test loads torch's OpenMP runtime.
tune_process()


@pytest.fixture(scope="session")
def single_process_group():
    """A gloo process group of world size 1, as `ctrscale train` creates without torchrun."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD


@pytest.fixture
def criteo_sample() -> Path:
    if not CRITEO_SAMPLE.exists():
        pytest.skip(f"the real Criteo sample is not present at {CRITEO_SAMPLE}")
    return CRITEO_SAMPLE


# Small enough that a DMP run takes seconds, large enough for a few dozen batches.
TINY_ROWS = 24_000
TINY_SCALE = 0.0003  # tables of 4 … 3,041 rows: a few epochs of signal in 24K rows


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from ctrscale.data.synth import generate

    directory = tmp_path_factory.mktemp("tiny") / "data"
    generate(directory, rows_per_day=TINY_ROWS, days=1, seed=3, cardinality_scale=TINY_SCALE)
    return directory
