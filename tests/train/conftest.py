"""A small synthetic dataset shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

# Small enough that a DMP run takes seconds, large enough for a few dozen batches.
TINY_ROWS = 24_000
TINY_SCALE = 0.0003  # tables of 4 … 3,041 rows: a few epochs of signal in 24K rows


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from ctrscale.data.synth import generate

    directory = tmp_path_factory.mktemp("tiny") / "data"
    generate(directory, rows_per_day=TINY_ROWS, days=1, seed=3, cardinality_scale=TINY_SCALE)
    return directory
