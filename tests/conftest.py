"""Shared fixtures: a world-size-1 gloo process group and the real Criteo sample rows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import CRITEO_SAMPLE, free_port


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
