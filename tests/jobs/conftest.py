"""Synthetic raw days shared by the refresh tests, and a fresh `Refresh` handle per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobs.harness import Refresh

FIRST_DAY = 20240101  # days are named day_YYYYMMDD.tsv, so the day numbers are dates
RAW_DAYS = 4
ROWS_PER_DAY = 20_000


@pytest.fixture(scope="session")
def raw_days(tmp_path_factory) -> Path:
    """Raw Criteo TSV of 2024-01-01 … 2024-01-04 (one planted teacher, so days agree)."""
    from ctrscale.data.synth import generate

    directory = tmp_path_factory.mktemp("raw")
    generate(
        directory,
        rows_per_day=ROWS_PER_DAY,
        days=RAW_DAYS,
        seed=3,
        cardinality_scale=0.0003,
        fmt="tsv",
        first_day=FIRST_DAY,
    )
    return directory


@pytest.fixture
def refresh(tmp_path, raw_days) -> Refresh:
    return Refresh(tmp_path, raw_days)
