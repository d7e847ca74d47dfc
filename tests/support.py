"""Helpers shared by tests in every folder (tests/ is on pytest's python path)."""

from __future__ import annotations

import socket
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "criteo_sample_100.tsv"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
