"""Shared fixtures: a world-size-1 gloo process group, the real Criteo sample rows and a small
synthetic dataset for training tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support import CRITEO_SAMPLE, S3_CREDENTIALS, free_port

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


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3-compatible server (moto) on a free port, with its endpoint and credentials in
    the environment (child processes inherit them) while the session's tests run."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto did not start"
            time.sleep(0.1)
    try:
        with pytest.MonkeyPatch.context() as environment:
            for key, value in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
                environment.setenv(key, value)
            yield endpoint
    finally:
        server.terminate()
        server.wait()
