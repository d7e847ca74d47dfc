"""`ctrscale train`: the training loop, readable top to bottom.

One code path for every launch: a single process, torchrun with N gloo CPU processes, or N
nccl GPUs. Each step every rank holds its slice of the same global batch; the loss of a rank
is its share of the *global* mean loss, so gradients equal the single-process ones on the same
global batch (see `Trainer.step` in step.py). Logging, evaluation and checkpointing are small
objects that decide for themselves when they are due.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch

from ctrscale import __version__
from ctrscale.config import (
    Config,
    save_config,
)
from ctrscale.data.loader import ParquetBatchLoader
from ctrscale.data.schema import TRUE_PROBABILITY
from ctrscale.distributed.context import DistContext, barrier, init_distributed, is_main_process
from ctrscale.distributed.shared_dir import check_shared_directory
from ctrscale.errors import CtrscaleError
from ctrscale.files import (
    finite_or_none,
    usable_directory,
    write_json_atomic,
    write_text_atomic,
)
from ctrscale.locking import ExclusiveLock
from ctrscale.optim.scaling import epochs_factor
from ctrscale.storage import is_uri
from ctrscale.train.checkpoint import (
    Checkpointer,
    Progress,
)
from ctrscale.train.checkpoint_mirror import CheckpointMirror, fetch_checkpoint
from ctrscale.train.evaluate import EvalResult, PeriodicEvaluator
from ctrscale.train.frequency import IdFrequency
from ctrscale.train.metrics_log import MetricsLog, TrainingWindow
from ctrscale.train.precision import dtype_name
from ctrscale.train.ramp import Ramp, join
from ctrscale.train.step import Trainer, build_trainer
from ctrscale.train.tracking import tracked_run

CONFIG_TOML = "config.toml"
METRICS_JSON = "metrics.json"
RUN_JSON = "run.json"


def train(config: Config, out_dir: str | Path, *, resume: bool = False) -> dict[str, Any]:
    out_dir = Path(out_dir)
    ctx = init_distributed(config.distributed)
    with run_lock(out_dir, ctx):
        return _train(config, out_dir, ctx, resume)


def _train(config: Config, out_dir: Path, ctx: DistContext, resume: bool) -> dict[str, Any]:
    torch.manual_seed(config.train.seed)
    train_loader, eval_loader = make_loaders(config, ctx)
    steps_per_epoch, total_steps = step_budget(config, train_loader)
    trainer = build_trainer(
        config,
        ctx,
        train_loader.table_sizes,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )
    uri = config.train.checkpoint_uri
    checkpointer = Checkpointer(
        out_dir / "checkpoints", config.train.checkpoint_every_steps, trainer, train_loader,
        CheckpointMirror(uri) if uri else None,
    )  # fmt: skip
    progress = start(checkpointer, config, resume, steps_per_epoch)
    if resume and progress.step >= total_steps and (out_dir / METRICS_JSON).exists():
        # Resuming a finished run changes nothing.
        print(f"{out_dir} finished at step {progress.step}; nothing to resume", file=sys.stderr)
        return json.loads((out_dir / METRICS_JSON).read_text())
    if ctx.is_main:
        write_run_files(out_dir, config, trainer, resumed_from=progress.step if resume else None)
    with tracked_run(config, out_dir, ctx.is_main, trainer.describe()) as sinks:
        log = MetricsLog(
            out_dir,
            enabled=ctx.is_main,
            total_steps=total_steps,
            start_step=progress.step,
            sinks=sinks,
        )
        if resume:
            log.message(f"resumed from step {progress.step} ({checkpointer.directory})")
        log.message(
            f"training {config.model.name}: {total_steps} steps of {config.data.batch_size} rows "
            f"({steps_per_epoch} per epoch) on {ctx.world_size} × {ctx.device.type}, "
            f"{'each rank decoding its share' if train_loader.sharded_decode else 'replicated'}"
            f" input (data.decode={config.data.decode}); sharding plan in {out_dir / 'plan.txt'}\n"
            f"hyperparameters at this batch size: {json.dumps(trainer.describe())}"
        )
        window = TrainingWindow(log, config.train.log_every_steps, total_steps, ctx.device)
        evaluator = PeriodicEvaluator(
            eval_loader,
            config.train.eval_every_steps,
            ctx.device,
            report_to(log),
            id_frequency(config, train_loader, ctx),
            trainer.precision,
        )

        with contextlib.closing(log):  # also on errors: an error message starts on its own line
            for batch, global_rows in batches(train_loader, config, ctx, progress, total_steps):
                loss_sum = trainer.step(batch, global_rows, progress.step)
                progress.advance(global_rows)
                window.after_step(progress.step, progress.epoch, loss_sum, global_rows, trainer)
                if window.loss_below(config.train.stop_below_loss):
                    log.message(f"training loss below {config.train.stop_below_loss}: stopping")
                    break
                with window.paused():
                    evaluator.after_step(trainer.dmp, progress.step, progress.epoch)
                    checkpointer.after_step(progress)
            result = evaluator.final(trainer.dmp, progress.step, progress.epoch)
            checkpointer.save(progress)
        final = {
            **result.as_dict(),
            "steps": progress.step,
            "epochs": progress.step / steps_per_epoch,
            "rows_per_s": window.rows_per_s(),
            "batch_size": config.data.batch_size,
            "world_size": ctx.world_size,
            "device": ctx.device.type,
            "hyperparameters": trainer.describe(),
        }
        if ctx.is_main:
            write_json_atomic(out_dir / METRICS_JSON, finite_or_none(final))
        return final


def make_loaders(config: Config, ctx: DistContext) -> tuple[ParquetBatchLoader, ParquetBatchLoader]:
    data = config.data
    if data.batch_size % ctx.world_size:
        raise CtrscaleError(
            f"data.batch_size={data.batch_size} must be divisible by the world size "
            f"{ctx.world_size} (each rank takes an equal slice of every global batch)"
        )
    seed = config.train.seed
    # A shard is one slice of shard_count × the batch: its ranks follow the other shards'.
    rank = data.shard_index * ctx.world_size + ctx.rank
    world = data.shard_count * ctx.world_size
    sharded = data.sharded_decode(ctx.device.type, ctx.world_size)
    train_loader = ParquetBatchLoader.from_config(
        data, "train", rank, world, seed=seed, batch_size=data.loader_batch_size,
        sharded_decode=sharded,
    )  # fmt: skip
    evaluation = ParquetBatchLoader.from_config(
        data,
        "eval",
        ctx.rank,
        ctx.world_size,
        seed=seed,
        batch_size=data.eval_batch_size - data.eval_batch_size % ctx.world_size,
        # Synthetic data carries the teacher's probabilities: the eval's Bayes-optimal AUC.
        extra_columns=(TRUE_PROBABILITY,) if train_loader.has_column(TRUE_PROBABILITY) else (),
        sharded_decode=sharded,
    )
    check_ids_fit(evaluation, train_loader.table_sizes, "the training data's tables")
    train_loader.pin_memory = evaluation.pin_memory = ctx.device.type == "cuda"
    return train_loader, evaluation


def check_ids_fit(loader: ParquetBatchLoader, table_sizes: dict[str, int], model: str) -> None:
    """The loader checks every id against its dataset's table sizes; those must fit `model`'s
    tables, or ids past a table's end would be looked up (FBGEMM then reads row 0)."""
    too_big = {
        feature: (size, table_sizes[feature])
        for feature, size in loader.table_sizes.items()
        if size > table_sizes[feature]
    }
    if too_big:
        raise CtrscaleError(
            f"{loader.files[0]}: ids up to these table sizes do not fit {model}: "
            + ", ".join(f"{k} {data} > {model_size}" for k, (data, model_size) in too_big.items())
        )


def step_budget(config: Config, loader: ParquetBatchLoader) -> tuple[int, int]:
    """(steps per epoch, steps of the run): `train.epochs` epochs (× ⌈s⌉ under the `regime`
    rule), at most `train.max_steps`."""
    steps_per_epoch = loader.num_batches()
    if steps_per_epoch == 0:
        raise CtrscaleError(
            f"the training data holds fewer rows than one batch ({config.data.batch_size}); "
            "lower data.batch_size or set data.drop_last=false"
        )
    epochs = config.train.epochs * epochs_factor(config)
    total_steps = epochs * steps_per_epoch
    if (ramp := Ramp.of(config.data)) is not None:
        steps_per_epoch, total_steps = ramp.steps(steps_per_epoch, epochs)
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    return steps_per_epoch, total_steps


@contextlib.contextmanager
def run_lock(out_dir: Path, ctx: DistContext) -> Iterator[None]:
    """One `ctrscale train` per run directory: rank 0 holds the lock, and every rank stops
    with its error when it is taken (instead of waiting in a collective)."""
    lock = ExclusiveLock(out_dir / ".lock", "another `ctrscale train` is writing this run")
    error = None
    if ctx.is_main:
        try:
            usable_directory(out_dir, "--out")
            lock.__enter__()
        except CtrscaleError as exc:
            error = exc
    if ctx.world_size > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise error
    try:
        check_shared_directory(out_dir, ctx.rank, ctx.world_size)
        yield
    finally:
        if ctx.is_main:
            lock.__exit__(None, None, None)


def start(
    checkpointer: Checkpointer, config: Config, resume: bool, steps_per_epoch: int
) -> Progress:
    """Where the run begins: its own latest checkpoint (`--resume`), a warm start, or step 0."""
    if not resume and (existing := checkpointer.existing_checkpoints()) is not None:
        raise CtrscaleError(
            f"{existing} already holds a run's checkpoints: pass --resume to continue it, or "
            "choose another --out"
        )
    if resume:
        progress = checkpointer.restore()
        if progress is None:
            raise CtrscaleError(
                f"--resume: {checkpointer.directory} holds no checkpoint to continue from"
            )
        return progress
    train = config.train
    if train.warm_start:
        source = train.warm_start
        if not is_uri(source):
            return checkpointer.warm_start(
                source, train.warm_start_optimizer, train.warm_start_continue_data, steps_per_epoch
            )
        into = checkpointer.directory.parent / "warm-start"  # every rank sees the run directory
        if is_main_process():
            fetch_checkpoint(source, into)
        barrier()
        progress = checkpointer.warm_start(
            into / "checkpoint", train.warm_start_optimizer, train.warm_start_continue_data,
            steps_per_epoch,
        )  # fmt: skip
        barrier()
        if is_main_process():
            shutil.rmtree(into)  # loaded: the copy would only fill the disk
        return progress
    return Progress()


def write_run_files(
    out_dir: Path, config: Config, trainer: Trainer, resumed_from: int | None
) -> None:
    """What ran: the effective config, the hyperparameters at this batch size, the plan, and
    who ran it (`run.json`: one entry per start, so a resumed run shows each)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / CONFIG_TOML)
    write_json_atomic(out_dir / "hyperparameters.json", trainer.describe())
    write_text_atomic(out_dir / "plan.txt", f"{trainer.dmp.plan}\n")
    starts = []
    if resumed_from is not None and (out_dir / RUN_JSON).exists():
        starts = json.loads((out_dir / RUN_JSON).read_text())["starts"]
    starts.append({**environment(trainer), "resumed_from_step": resumed_from})
    write_json_atomic(out_dir / RUN_JSON, {"starts": starts})


def batches(
    loader: ParquetBatchLoader,
    config: Config,
    ctx: DistContext,
    progress: Progress,
    total_steps: int,
) -> Iterator[tuple[Batch, int]]:
    """This rank's batches on the device with the global batch's row count, epoch after epoch
    from where `progress` stands (a resumed loader continues its epoch), until `total_steps`."""
    ramp = Ramp.of(config.data)
    # This run's ranks among the loader's (a shard is one slice of shard_count × the batch).
    ranks = range(
        config.data.shard_index * ctx.world_size, (config.data.shard_index + 1) * ctx.world_size
    )
    resumed_mid_epoch = progress.step > 0
    while progress.step < total_steps:
        if not resumed_mid_epoch:
            loader.set_epoch(progress.epoch)
        resumed_mid_epoch = False
        pending: list[Batch] = []
        rows = 0
        for batch in loader:
            pending.append(batch)
            rows += loader.rows_of(loader.state_dict()["batches_done"] - 1, ranks)
            if ramp is not None and len(pending) < ramp.joined(progress.step):
                continue
            yield _on_device(join(pending), ctx), rows
            pending, rows = [], 0
            if progress.step >= total_steps:
                return
        if pending:  # the epoch's last, smaller ramp step
            yield _on_device(join(pending), ctx), rows
        progress.epoch += 1


def _on_device(batch: Batch, ctx: DistContext) -> Batch:
    return batch.to(ctx.device, non_blocking=True)  # from pinned memory on CUDA


def id_frequency(
    config: Config, train_loader: ParquetBatchLoader, ctx: DistContext
) -> IdFrequency | None:
    """The training split's id counts for evaluation by frequency, unless turned off."""
    edges = config.train.frequency_buckets
    if not edges:
        return None
    return IdFrequency.of_training_split(train_loader, edges, ctx.rank, ctx.world_size)


def report_to(log: MetricsLog):
    """What an evaluation result becomes: an `eval` record and one line on the terminal."""

    def report(step: int, epoch: int, result: EvalResult) -> None:
        log.record("eval", step, {"epoch": epoch, **result.as_dict()})
        gap = "" if result.bayes_auc is None else f" (Bayes-optimal {result.bayes_auc:.5f})"
        by_bucket = ""
        if result.buckets:
            by_bucket = "; by rarest id's training count: " + ", ".join(
                f"{label} {b.auc:.4f} ({b.rows:,})" if b.auc is not None else f"{label} —"
                for label, b in result.buckets.items()
            )
        log.message(
            f"step {step}: eval AUC {result.auc:.5f}{gap}, LogLoss {result.logloss:.5f} "
            f"on {result.rows:,} rows{by_bucket}"
        )

    return report


def environment(trainer: Trainer) -> dict[str, Any]:
    """Who ran a job, where, with what: for `run.json`."""
    ctx = trainer.ctx
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": sys.argv,
        "ctrscale": __version__,
        "commit": source_commit(),
        "host": socket.gethostname(),
        "world_size": ctx.world_size,
        "device": ctx.device.type,
        "precision": dtype_name(trainer.precision),
        "precision_reason": trainer.precision_reason,
        "torch": torch.__version__,
    }


def source_commit() -> str | None:
    """The git commit of ctrscale's source, when it runs from a checkout."""
    try:
        done = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None
