"""The refresh tests' handle on one registry: run `ctrscale refresh` on it, start one to kill,
check the registry's invariants."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import REPO_ROOT

from ctrscale.distributed.context import child_environment
from ctrscale.jobs.partitions import partition_problem
from ctrscale.jobs.registry import Registry

PIPELINE = REPO_ROOT / "pipelines" / "daily_refresh.toml"


class Refresh:
    """One test's registry, dataset and raw directory, and `ctrscale refresh` runs on them."""

    def __init__(self, root: Path, raw_days: Path) -> None:
        self.root = root
        self.registry = root / "registry"
        self.dataset = root / "dataset"
        self.raw = root / "raw"
        self.raw.mkdir()
        for day in raw_days.glob("day_*.tsv"):
            (self.raw / day.name).symlink_to(day)

    def settings(self, **extra: object) -> dict[str, object]:
        # The model and optimizer of tests/train/runner.py: a few seconds per day on CPU.
        return {
            "refresh.registry": str(self.registry),
            "refresh.dataset": str(self.dataset),
            "refresh.raw_pattern": str(self.raw / "day_{yyyymmdd}.tsv"),
            "refresh.table_size": 4096,
            # Both sides of the gate are trained on tiny days; the gate's exact semantics are
            # tested in test_refresh_units.py, a forced rejection in test_refresh_job.py.
            "refresh.auc_tolerance": 0.02,
            "data.batch_size": 2048,
            "data.eval_batch_size": 4096,
            "data.shuffle_buffer_rows": 8192,
            "optim.embedding.name": "adagrad",
            "optim.embedding.lr": 0.05,
            "optim.dense.lr": 0.003,
            "model.dnn": [32, 16],
            "train.epochs": 2,
            "train.checkpoint_every_steps": 4,
            "train.log_every_steps": 4,
            **extra,
        }

    def args(self, *when: str, **extra: object) -> list[str]:
        args = ["-m", "ctrscale", "refresh", "--config", str(PIPELINE), *when]
        for key, value in self.settings(**extra).items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        return args

    def env(self, **variables: str) -> dict[str, str]:
        return {**child_environment(), **variables}

    def run(self, *when: str, **extra: object) -> Result:
        done = subprocess.run(
            [sys.executable, *self.args(*when, **extra)],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=600,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def start(self, *when: str, log: Path, pause_before: str | None = None, **extra: object):
        """A refresh in the background, its stderr in `log` (to wait for and kill)."""
        variables = {} if pause_before is None else {"CTRSCALE_TEST_PAUSE_BEFORE": pause_before}
        with open(log, "w") as stderr:
            return subprocess.Popen(
                [sys.executable, *self.args(*when, **extra)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=self.env(**variables),
            )


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr
        self.summary = json.loads(stdout.strip().splitlines()[-1])

    def __repr__(self) -> str:
        return f"exit {self.code}, summary {self.summary}\nstderr tail:\n{self.stderr[-4000:]}"


def assert_registry_consistent(registry_dir: Path, published: list[str], latest: str) -> None:
    """Exactly `published` models, each verifying against its manifest; `latest` complete;
    no staging dir, publish journal or leftover work dir of a published date."""
    registry = Registry(registry_dir)
    assert registry.published_dates() == published
    assert sorted(p.name for p in (registry_dir / "models").iterdir()) == published
    for date in published:
        registry.verify(date)
    assert registry.latest() == latest
    assert not (registry_dir / "publishing").exists()
    assert not any((registry_dir / "work").glob("*"))


def assert_dataset_consistent(dataset: Path, day_numbers: list[int]) -> None:
    """Exactly these day partitions, each verifying against its manifest; no temp dirs."""
    partitions = sorted(p.name for p in dataset.iterdir() if p.name.startswith(("day=", ".tmp")))
    assert partitions == [f"day={n}" for n in sorted(day_numbers)]
    for name in partitions:
        assert partition_problem(dataset / name) is None, name
