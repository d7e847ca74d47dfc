"""Training and evaluation for the refresh: inside its process, or under torchrun.

`refresh.nproc = 1` calls `train` / `evaluate_checkpoint` in the refresh process. With N > 1
the refresh process launches `torchrun --standalone --nproc_per_node N -m ctrscale train|
evaluate` on the config files it wrote, and reads the results back (metrics.json, the JSON
line `evaluate` prints). The refresh itself never runs under torchrun: the lock, prepare, the
gate and publishing are single-writer steps that stay simple in one process, and only the
steps that need every GPU get them. The children are tied to the refresh process
(PR_SET_PDEATHSIG), so a killed refresh does not leave a training run writing into the
registry behind the next one's back.
"""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ctrscale.config import Config, UserSettings
from ctrscale.distributed.context import child_environment

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec; libc is loaded beforehand so nothing here
    # needs a lock another thread of the parent might have held at fork time.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _torchrun(nproc: int, args: list[str], *, capture: bool) -> str:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc), "-m", "ctrscale", *args,
    ]  # fmt: skip
    env = child_environment()
    done = subprocess.run(
        command,
        env=env,
        # Progress goes to our stderr; stdout stays for the job's JSON summary line.
        stdout=subprocess.PIPE if capture else sys.stderr,
        text=True,
        preexec_fn=_die_with_parent,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(command)}` exited with code {done.returncode}; its ranks' errors are "
            "in this job's log (stderr) just above"
        )
    return done.stdout or ""


def train_command(config_file: Path, run_dir: Path) -> list[str]:
    """`ctrscale train` of a run directory in a child process, resuming it if it started."""
    from ctrscale.train.checkpoint import LATEST

    resume = ["--resume"] if (run_dir / "checkpoints" / LATEST).exists() else []
    return [
        sys.executable, "-m", "ctrscale", "train",
        "--config", str(config_file), "--out", str(run_dir), *resume,
    ]  # fmt: skip


def run_training(
    config: Config, config_file: Path, run_dir: Path, *, resume: bool, nproc: int
) -> dict[str, Any]:
    """Train (resuming `run_dir` when asked); the final metrics `train` writes."""
    # Imported here: the sweep's parent process uses `train_command` and never loads a model.
    from ctrscale.train.loop import train

    if nproc == 1:
        return train(config, run_dir, resume=resume)
    args = ["train", "--config", str(config_file), "--out", str(run_dir)]
    _torchrun(nproc, [*args, "--resume"] if resume else args, capture=False)
    return json.loads((run_dir / "metrics.json").read_text())


def run_evaluation(
    config: Config, config_file: Path, checkpoint: Path, *, nproc: int
) -> dict[str, Any]:
    """Exact metrics of `checkpoint` on `config`'s eval split."""
    from ctrscale.train.commands import evaluate_checkpoint

    if nproc == 1:
        settings = UserSettings(config.model_dump(mode="json", exclude_none=True), str(config_file))
        return evaluate_checkpoint(settings, checkpoint)
    args = ["evaluate", "--config", str(config_file), "--checkpoint", str(checkpoint)]
    *progress, last = _torchrun(nproc, args, capture=True).strip().splitlines()
    if progress:
        print("\n".join(progress), file=sys.stderr)
    return json.loads(last)
