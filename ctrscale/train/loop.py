"""`ctrscale train`: the training loop, readable top to bottom.

One code path for every launch: a single process, torchrun with N gloo CPU processes, or N
nccl GPUs. Each step every rank holds its slice of the same global batch; the loss of a rank
is its share of the *global* mean loss, so gradients equal the single-process ones on the same
global batch (see `Trainer.step` in step.py). Logging, evaluation and checkpointing are small
objects that decide for themselves when they are due.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch

from ctrscale.config import Config, load_config, save_config
from ctrscale.data.loader import ParquetBatchLoader
from ctrscale.data.schema import TRUE_PROBABILITY
from ctrscale.distributed.context import DistContext, global_sum, init_distributed
from ctrscale.errors import CtrscaleError
from ctrscale.files import write_json_atomic, write_text_atomic
from ctrscale.train.checkpoint import Checkpointer, Progress, load_into, resolve_checkpoint
from ctrscale.train.evaluate import EvalResult, PeriodicEvaluator, evaluate
from ctrscale.train.metrics_log import MetricsLog, TrainingWindow
from ctrscale.train.step import Trainer, build_trainer


def train(config: Config, out_dir: str | Path, *, resume: bool = False) -> dict[str, Any]:
    out_dir = Path(out_dir)
    ctx = init_distributed(config.distributed)
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
    checkpointer = Checkpointer(
        out_dir / "checkpoints", config.train.checkpoint_every_steps, trainer, train_loader
    )
    progress = start(checkpointer, config, resume)
    if ctx.is_main:
        write_run_files(out_dir, config, trainer)

    log = MetricsLog(
        out_dir,
        enabled=ctx.is_main,
        total_steps=total_steps,
        start_step=progress.step,
        tensorboard=config.train.tensorboard,
    )
    log.message(
        f"training {config.model.name}: {total_steps} steps of {config.data.batch_size} rows "
        f"({steps_per_epoch} per epoch) on {ctx.world_size} × {ctx.device.type}; "
        f"sharding plan in {out_dir / 'plan.txt'}\n"
        f"hyperparameters at this batch size: {json.dumps(trainer.describe())}"
    )
    window = TrainingWindow(log, config.train.log_every_steps, total_steps, ctx.device)
    evaluator = PeriodicEvaluator(
        eval_loader, config.train.eval_every_steps, ctx.device, report_to(log)
    )

    for batch, global_rows in batches(train_loader, config, ctx, progress, total_steps):
        loss_sum = trainer.step(batch, global_rows, progress.step)
        progress.advance(global_rows)
        window.after_step(progress.step, progress.epoch, loss_sum, global_rows, trainer)
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
        write_json_atomic(out_dir / "metrics.json", final)
    log.close()
    return final


def make_loaders(config: Config, ctx: DistContext) -> tuple[ParquetBatchLoader, ParquetBatchLoader]:
    data = config.data
    if data.batch_size % ctx.world_size:
        raise CtrscaleError(
            f"data.batch_size={data.batch_size} must be divisible by the world size "
            f"{ctx.world_size} (each rank takes an equal slice of every global batch)"
        )
    seed = config.train.seed
    train_loader = ParquetBatchLoader.from_config(
        data, "train", ctx.rank, ctx.world_size, seed=seed
    )
    evaluation = ParquetBatchLoader.from_config(
        data,
        "eval",
        ctx.rank,
        ctx.world_size,
        seed=seed,
        batch_size=data.eval_batch_size - data.eval_batch_size % ctx.world_size,
        # Synthetic data carries the teacher's probabilities: the eval's Bayes-optimal AUC.
        extra_columns=(TRUE_PROBABILITY,) if train_loader.has_column(TRUE_PROBABILITY) else (),
    )
    return train_loader, evaluation


def step_budget(config: Config, loader: ParquetBatchLoader) -> tuple[int, int]:
    """(steps per epoch, steps of the run): `train.epochs` epochs, at most `train.max_steps`."""
    steps_per_epoch = loader.num_batches()
    if steps_per_epoch == 0:
        raise CtrscaleError(
            f"the training data holds fewer rows than one batch ({config.data.batch_size}); "
            "lower data.batch_size or set data.drop_last=false"
        )
    total_steps = config.train.epochs * steps_per_epoch
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    return steps_per_epoch, total_steps


def start(checkpointer: Checkpointer, config: Config, resume: bool) -> Progress:
    """Where the run begins: its own latest checkpoint (`--resume`), a warm start, or step 0."""
    if not resume and checkpointer.has_checkpoint():
        raise CtrscaleError(
            f"{checkpointer.directory.parent} already holds a run's checkpoints: pass --resume "
            "to continue it, or choose another --out"
        )
    if resume and (progress := checkpointer.restore()) is not None:
        return progress
    if config.train.warm_start:
        checkpointer.warm_start(config.train.warm_start, config.train.warm_start_optimizer)
    return Progress()


def write_run_files(out_dir: Path, config: Config, trainer: Trainer) -> None:
    """What ran: the effective config, the hyperparameters at this batch size, the plan."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.toml")
    write_json_atomic(out_dir / "hyperparameters.json", trainer.describe())
    write_text_atomic(out_dir / "plan.txt", f"{trainer.dmp.plan}\n")


def batches(
    loader: ParquetBatchLoader,
    config: Config,
    ctx: DistContext,
    progress: Progress,
    total_steps: int,
) -> Iterator[tuple[Batch, int]]:
    """This rank's batches on the device with the global batch's row count, epoch after epoch
    from where `progress` stands (a resumed loader continues its epoch), until `total_steps`."""
    resumed_mid_epoch = progress.step > 0
    while progress.step < total_steps:
        if not resumed_mid_epoch:
            loader.set_epoch(progress.epoch)
        resumed_mid_epoch = False
        for batch in loader:
            batch = batch.to(ctx.device)
            if config.data.drop_last:
                global_rows = config.data.batch_size
            else:
                global_rows = int(global_sum([batch.labels.numel()], ctx.device)[0])
            yield batch, global_rows
            if progress.step >= total_steps:
                return
        progress.epoch += 1


def report_to(log: MetricsLog):
    """What an evaluation result becomes: an `eval` record and one line on the terminal."""

    def report(step: int, epoch: int, result: EvalResult) -> None:
        log.record("eval", step, {"epoch": epoch, **result.as_dict()})
        gap = "" if result.bayes_auc is None else f" (Bayes-optimal {result.bayes_auc:.5f})"
        log.message(
            f"step {step}: eval AUC {result.auc:.5f}{gap}, LogLoss {result.logloss:.5f} "
            f"on {result.rows:,} rows"
        )

    return report


def evaluate_checkpoint(config: Config, source: str | Path) -> EvalResult:
    """Exact eval metrics of a saved model on `config`'s eval split (any world size)."""
    ctx = init_distributed(config.distributed)
    _, eval_loader = make_loaders(config, ctx)
    trainer = build_trainer(config, ctx, eval_loader.table_sizes, steps_per_epoch=1, total_steps=1)
    load_into(trainer, resolve_checkpoint(source), with_optimizer=False)
    return evaluate(trainer.dmp, eval_loader, ctx.device)


def run_evaluate_cli(args) -> int:
    config = load_config(args.config, args.overrides)
    result = evaluate_checkpoint(config, args.checkpoint)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(result.as_dict()))
    return 0


def run_cli(args) -> int:
    config = load_config(args.config, args.overrides)
    metrics = train(config, args.out, resume=args.resume)
    if not dist.is_initialized() or dist.get_rank() == 0:
        summary = {k: metrics[k] for k in ("auc", "logloss", "bayes_auc", "steps", "rows_per_s")}
        print(json.dumps(summary))
    return 0
