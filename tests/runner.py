"""Running `ctrscale train` in fresh processes (single, or under torchrun) for the tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from support import free_port
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from ctrscale.distributed.context import child_environment


def tiny_overrides(dataset: Path, **extra: object) -> list[str]:
    settings = {
        "data.train": [str(dataset)],
        "data.batch_size": 2048,
        "data.eval_batch_size": 4096,
        "data.shuffle_buffer_rows": 8192,
        "optim.embedding.name": "adagrad",
        "optim.embedding.lr": 0.05,
        "optim.dense.lr": 0.003,
        "model.dnn": [32, 16],
        "train.log_every_steps": 2,
        **extra,
    }
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


def run_ctrscale(
    args: list[str], *, nproc: int = 1, check: bool = True, **popen
) -> subprocess.CompletedProcess:
    """`ctrscale …` in a new process; with nproc > 1 under torchrun (gloo on CPU)."""
    env = child_environment()
    if nproc == 1:
        command = [sys.executable, "-m", "ctrscale", *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "ctrscale", *args,
        ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, **popen)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{done.stderr[-6000:]}")
    return done


def train_args(out: Path, overrides: list[str]) -> list[str]:
    args = ["train", "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    return args


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def checkpoint_tensors(out: Path, tmp_path: Path) -> dict:
    """Everything a run's latest checkpoint holds (model and optimizer state) as plain tensors."""
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    flat = tmp_path / f"{out.parent.name}-{out.name}.pt"
    dcp_to_torch_save(latest, flat)
    return torch.load(flat, weights_only=False)


def final_parameters(out: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The model of a run's latest checkpoint as plain tensors."""
    return checkpoint_tensors(out, tmp_path)["model"]
