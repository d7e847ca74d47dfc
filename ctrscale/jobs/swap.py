"""SWAP as a job (Gupta, Serrano & DeCoste, "Stochastic Weight Averaging in Parallel", ICLR
2020): `ctrscale swap --config PRESET --out DIR`.

    DIR/phase1/       `ctrscale train` at data.batch_size for swap.phase1_fraction of the run's
                      steps (or until train.stop_below_loss), under torchrun with
                      swap.phase1_nproc > 1
    DIR/replica-I/    W = swap.replicas runs of `ctrscale train` warm-started from phase 1's
                      weights and optimizer state (each then keeps its own), at
                      swap.replica_batch_size, on shard I of W of the rest of the data
                      (train.warm_start_continue_data, data.shard_index/shard_count)
    DIR/averaged/     their average (ctrscale/train/averaging.py) as a checkpoint, with its
                      exact evaluation in metrics.json
    DIR/metrics.json  the averaged model's metrics with each phase's

Every phase is a run directory of its own: a finished one (metrics.json) is skipped, a started
one resumed, so rerunning the command after a crash continues where it stopped. The replicas
are separate processes, `swap.parallel` at a time (slot j gets LOCAL_RANK j: GPU j on CUDA, a
1/parallel share of the cores on CPU): each replica holds whole tables, as the paper's workers
hold whole models, and needs no collective with the others. The averaging runs in this process.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch

from ctrscale.choices import SwapAverage
from ctrscale.config import Config, build_config, save_config, user_settings
from ctrscale.data.loader import ParquetBatchLoader
from ctrscale.distributed.context import child_environment, init_distributed
from ctrscale.errors import CtrscaleError
from ctrscale.files import finite_or_none, write_json_atomic
from ctrscale.jobs.launch import run_training, train_command
from ctrscale.locking import ExclusiveLock
from ctrscale.train.averaging import RunningAverage, feature_of, local_pieces, table_of
from ctrscale.train.averaging import touch_counts as count_touches
from ctrscale.train.checkpoint import (
    LATEST,
    STATE_FILE,
    Checkpointer,
    Progress,
    latest_checkpoint,
    load_into,
)
from ctrscale.train.evaluate import evaluate
from ctrscale.train.loop import id_frequency, make_loaders, step_budget
from ctrscale.train.precision import forward_logits
from ctrscale.train.step import Trainer, build_trainer

METRICS = "metrics.json"


def run_cli(args) -> int:
    config = build_config(user_settings(args.config, args.overrides))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ExclusiveLock(out / ".swap.lock", "another `ctrscale swap` is running in this directory"):
        summary = swap(config, out)
    print(json.dumps(finite_or_none(summary)))
    return 0


def swap(config: Config, out: Path) -> dict[str, Any]:
    """Train, refine and average; the averaged model's metrics with every phase's."""
    phase1_dir = out / "phase1"
    phase1 = phase1_config(config)
    _run_phase(phase1, phase1_dir, nproc=config.swap.phase1_nproc)
    replicas = [replica_config(config, i, phase1_dir) for i in range(config.swap.replicas)]
    replica_dirs = [out / f"replica-{i}" for i in range(config.swap.replicas)]
    _run_replicas(replicas, replica_dirs, config.swap.parallel)
    averaged_dir = out / "averaged"
    if not (averaged_dir / METRICS).exists():
        average_replicas(replicas, replica_dirs, phase1_dir, averaged_dir)
    summary = {
        **_read(averaged_dir),
        "phase1": _brief(_read(phase1_dir)),
        "replicas": [_brief(_read(d)) for d in replica_dirs],
    }
    write_json_atomic(out / METRICS, finite_or_none(summary))
    return summary


def phase1_config(config: Config) -> Config:
    """The large-batch phase: the run's config, stopped after `phase1_fraction` of its steps."""
    loader = ParquetBatchLoader.from_config(
        config.data, "train", seed=config.train.seed, batch_size=config.data.loader_batch_size
    )
    _, total_steps = step_budget(config, loader)
    steps = max(1, round(config.swap.phase1_fraction * total_steps))
    # The replicas continue after the rows phase 1 read: a prefix of the stream only when
    # every rank reads the replicated stream.
    return _with(config, {"train": {"max_steps": steps}, "data": {"decode": "replicated"}})


def replica_config(config: Config, index: int, phase1_dir: Path) -> Config:
    """Replica `index`: phase 1's model and optimizer state, the small batch, its shard of the
    data from where phase 1 stopped, to the end of the run."""
    swap = config.swap
    batch = swap.replica_batch_size or config.optim.schedule.base_batch_size
    return _with(
        config,
        {
            "data": {
                "batch_size": batch,
                "shard_index": index,
                "shard_count": swap.replicas,
                "ramp_from_batch_size": None,
                "ramp_steps": None,
            },
            "train": {
                "warm_start": str(phase1_dir / "checkpoints"),
                "warm_start_optimizer": True,
                "warm_start_continue_data": True,
                "max_steps": None,
                "stop_below_loss": None,
            },
        },
    )


def _with(config: Config, changes: dict[str, dict[str, Any]]) -> Config:
    tree = config.model_dump(mode="json")
    for section, values in changes.items():
        tree[section].update(values)
    return Config.model_validate(tree)


def _run_phase(config: Config, run_dir: Path, nproc: int) -> None:
    if (run_dir / METRICS).exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "run.toml"
    save_config(config, config_file)
    resume = (run_dir / "checkpoints" / LATEST).exists()
    if nproc == 1:  # a child process, so that this one holds no model while it trains
        _wait([_start(config_file, run_dir, slot=0, slots=1)], [run_dir])
    else:
        run_training(config, config_file, run_dir, resume=resume, nproc=nproc)


def _run_replicas(configs: list[Config], run_dirs: list[Path], parallel: int) -> None:
    todo = [(c, d) for c, d in zip(configs, run_dirs, strict=True) if not (d / METRICS).exists()]
    for first in range(0, len(todo), parallel):
        wave = todo[first : first + parallel]
        children = []
        for slot, (config, run_dir) in enumerate(wave):
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, run_dir / "run.toml")
            children.append(_start(run_dir / "run.toml", run_dir, slot, len(wave)))
        _wait(children, [run_dir for _, run_dir in wave])


def _start(config_file: Path, run_dir: Path, slot: int, slots: int) -> subprocess.Popen:
    env = {**child_environment(), "LOCAL_RANK": str(slot), "LOCAL_WORLD_SIZE": str(slots)}
    log = open(run_dir / "train.log", "a")  # noqa: SIM115 - closed with the child in _wait
    return subprocess.Popen(
        train_command(config_file, run_dir), stdout=log, stderr=subprocess.STDOUT, env=env
    )


def _wait(children: list[subprocess.Popen], run_dirs: list[Path]) -> None:
    failed = []
    for child, run_dir in zip(children, run_dirs, strict=True):
        child.wait()
        child.stdout.close() if child.stdout else None
        if child.returncode != 0 or not (run_dir / METRICS).exists():
            failed.append(f"{run_dir} (exit code {child.returncode}; see {run_dir}/train.log)")
    if failed:
        raise CtrscaleError("SWAP: training failed in " + ", ".join(failed))


def _read(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / METRICS).read_text())


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("auc", "logloss", "steps", "batch_size", "rows_per_s")
    return {key: metrics.get(key) for key in keys}


# -- phase 3 -------------------------------------------------------------------------------


def average_replicas(
    replicas: list[Config], replica_dirs: list[Path], phase1_dir: Path, out: Path
) -> dict[str, Any]:
    """Average the replicas' final models into `out/checkpoints`, re-estimate batch-norm
    statistics, evaluate exactly; the metrics (also written to `out/metrics.json`)."""
    config = _with(replicas[0], {"data": {"shard_index": 0, "shard_count": 1}})
    ctx = init_distributed(config.distributed)
    if ctx.world_size != 1:
        raise CtrscaleError("`ctrscale swap` runs in one process (it launches its own phases)")
    train_loader, eval_loader = make_loaders(config, ctx)
    trainer = build_trainer(config, ctx, train_loader.table_sizes, steps_per_epoch=1, total_steps=1)
    touches = None
    if config.swap.average == SwapAverage.TOUCH_WEIGHTED:
        touches = replica_touches(replicas[0], replica_dirs[0], phase1_dir)
    checkpoints = [latest_checkpoint(d / "checkpoints") for d in replica_dirs]
    averages = average_into(trainer, checkpoints, touches)
    if config.model.batch_norm:
        reestimate_batch_norm(trainer, train_loader, config.swap.bn_batches)
    steps = max(_read(d)["steps"] for d in replica_dirs)
    Checkpointer(out / "checkpoints", None, trainer, train_loader).save(Progress(step=steps))
    frequency = id_frequency(config, train_loader, ctx)
    result = evaluate(trainer.dmp, eval_loader, ctx.device, frequency, trainer.precision)
    metrics = {
        **result.as_dict(),
        "steps": steps,
        "batch_size": config.data.batch_size,
        "average": str(config.swap.average),
        "tensors_averaged": averages,
    }
    write_json_atomic(out / METRICS, finite_or_none(metrics))
    return metrics


def replica_touches(replica: Config, replica_dir: Path, phase1_dir: Path) -> list[dict]:
    """How often each replica's phase-2 rows looked up each id: one pass over the data they
    trained on, read as global batches of W × b rows (replica i's shard is slice i of each)."""
    swap = replica.swap
    data = replica.data.model_copy(update={"shard_index": 0, "shard_count": 1})
    loader = ParquetBatchLoader.from_config(
        data, "train", seed=replica.train.seed, batch_size=replica.data.batch_size * swap.replicas
    )
    phase1_state = json.loads(
        (latest_checkpoint(phase1_dir / "checkpoints") / STATE_FILE).read_text()
    )
    loader.continue_from(phase1_state["loader"])
    cursor = loader.state_dict()
    steps_per_epoch = loader.num_batches()
    first = cursor["epoch"] * steps_per_epoch + cursor["batches_done"]
    last = _read(replica_dir)["steps"]

    def remaining():
        step, epoch = first, cursor["epoch"]
        while step < last:
            for batch in loader:
                yield batch
                step += 1
                if step >= last:
                    return
            epoch += 1
            loader.set_epoch(epoch)

    return count_touches(remaining(), swap.replicas, loader.table_sizes)


def average_into(
    trainer: Trainer, checkpoints: list[Path | None], touches: list[dict] | None
) -> int:
    """Load each checkpoint's model in turn, average every tensor this process holds (table
    rows weighted by `touches` when given), and leave the average in `trainer`'s model."""
    sums: dict[tuple[str, int], RunningAverage] = {}
    for index, checkpoint in enumerate(checkpoints):
        if checkpoint is None:
            raise CtrscaleError(f"SWAP: replica {index} has no checkpoint to average")
        load_into(trainer, checkpoint, with_optimizer=False)
        for key, piece, row0 in _pieces(trainer):
            table = table_of(key)
            weights = None
            if touches is not None and table is not None:
                weights = touches[index][feature_of(table)][row0 : row0 + piece.shape[0]]
            sums.setdefault((key, row0), RunningAverage()).add(piece, weights)
    state = trainer.state_tensors(with_optimizer=False)
    for key, piece, row0 in _pieces(trainer, state):
        piece.copy_(sums[(key, row0)].result().to(piece.dtype))
    trainer.load_state_tensors(state)
    return len(sums)


def _pieces(trainer: Trainer, state: dict | None = None):
    state = state or trainer.state_tensors(with_optimizer=False)
    for key, value in state["model"].items():
        for piece, row0 in local_pieces(value):
            yield key, piece, row0


@torch.no_grad()
def reestimate_batch_norm(trainer: Trainer, loader: ParquetBatchLoader, batches: int) -> None:
    """The averaged weights' batch-norm statistics, from `batches` training batches (the
    paper's step; `swa_utils.update_bn` cannot feed a KeyedJaggedTensor)."""
    norms = [
        m for m in trainer.dmp.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    trainer.dmp.train()
    loader.set_epoch(0)
    for batch, _ in zip(loader, range(batches), strict=False):
        batch = batch.to(trainer.ctx.device)
        forward_logits(trainer.dmp, batch, trainer.precision)  # as training computes it
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
