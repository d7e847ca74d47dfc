"""`ctrscale selftest`: the first command on a new machine (a GPU node especially).

On generated data it runs what a real job relies on, on the configured device and backend —
one process, or every rank under `torchrun --nproc_per_node N -m ctrscale selftest`:

1. `train`: 16 steps of a sharded DeepFM, CowClip on, embedding Adam (FBGEMM's fused kernel
   on CUDA), a checkpoint halfway and at the end; the loss must stay finite;
2. a stop and `--resume` from the halfway checkpoint must end where the uninterrupted run
   ended (bitwise on CPU; on CUDA within 1e-6, FBGEMM's GPU backward may sum in another order);
3. `evaluate` of the final checkpoint must give the training run's own final AUC and LogLoss
   (the checkpoint round-trip);
4. the AUC must beat chance (0.53: 3σ above 0.5 on its 4,000 eval rows).

Prints one JSON line with each check's result; exit code 0 when all pass, 1 otherwise.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ctrscale.config import Config, UserSettings, build_config, user_settings
from ctrscale.data.synth import generate
from ctrscale.distributed.context import init_distributed
from ctrscale.train.commands import evaluate_checkpoint
from ctrscale.train.loop import train

ROWS = 40_000
STEPS = 16  # of 2,048 rows (of 36K training rows): a checkpoint at 8 and 16


def selftest_settings(data_dir: Path) -> dict[str, Any]:
    """The self-test's run, laid under the user's `--config`/`--set` (device, backend,
    sharding and model size may be changed; the protocol may not)."""
    return {
        "data": {"train": [str(data_dir)], "batch_size": 2048, "eval_batch_size": 8192},
        "model": {"name": "deepfm", "embedding_dim": 16},
        # Learning rates that learn in 16 steps; CowClip clips (the rule is not under test).
        "optim": {
            "embedding": {"name": "adam", "lr": 0.05},
            "dense": {"lr": 0.003},
            "cowclip": {"mode": "paper"},
            "schedule": {"rule": "none"},
        },
        "train": {"max_steps": STEPS, "checkpoint_every_steps": STEPS // 2, "epochs": 1},
    }


def run_cli(args) -> int:
    settings = user_settings(args.config, args.overrides)
    directory = Path(args.dir)
    config = build_config(settings)
    ctx = init_distributed(config.distributed)
    if ctx.is_main:
        shutil.rmtree(directory, ignore_errors=True)
        generate(directory / "data", rows_per_day=ROWS, seed=0, cardinality_scale=0.001)
    if dist.is_initialized():
        dist.barrier()
    report = selftest(settings, directory)
    if ctx.is_main:
        print(json.dumps(report))
    return 0 if report["passed"] else 1


def _config(settings: UserSettings, directory: Path, **train: Any) -> Config:
    """The self-test's settings with the user's laid over them, then `train` overrides."""
    base = build_config(UserSettings(selftest_settings(directory / "data"), "selftest"))
    config = build_config(settings, base=base)
    return config.model_copy(update={"train": config.train.model_copy(update=train)})


def selftest(settings: UserSettings, directory: Path) -> dict[str, Any]:
    straight = train(_config(settings, directory), directory / "straight", resume=False)
    halfway = _config(settings, directory, max_steps=STEPS // 2)
    train(halfway, directory / "resumed", resume=False)
    resumed = train(_config(settings, directory), directory / "resumed", resume=True)
    # The checkpoint's own config (model, data, device) is what evaluate uses.
    evaluated = evaluate_checkpoint(UserSettings({}, "selftest"), directory / "straight")
    exact = straight["device"] == "cpu"
    checks = {
        "trains": math.isfinite(straight["logloss"]) and straight["steps"] == STEPS,
        "resume_matches": _same(resumed, straight, exact),
        "checkpoint_round_trip": _same(evaluated, straight, exact),
        "learns": straight["auc"] > 0.53,  # chance ± 3σ on 4,000 eval rows
    }
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "device": straight["device"],
        "world_size": straight["world_size"],
        "auc": straight["auc"],
        "resumed_auc": resumed["auc"],
        "evaluated_auc": evaluated["auc"],
        "embedding_update": straight["hyperparameters"]["embedding"],
        "directory": str(directory),
    }


def _same(left: dict[str, Any], right: dict[str, Any], exact: bool) -> bool:
    tolerance = 0.0 if exact else 1e-6
    return all(abs(left[key] - right[key]) <= tolerance for key in ("auc", "logloss"))
