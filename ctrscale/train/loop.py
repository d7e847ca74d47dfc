"""`ctrscale train`: the training loop, readable top to bottom.

One code path for every launch: a single process, torchrun with N gloo CPU processes, or N
nccl GPUs. Each step every rank holds its slice of the same global batch; the loss of a rank
is its share of the *global* mean loss, so gradients equal the single-process ones on the same
global batch (see `Trainer.step` in step.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ctrscale.config import Config, load_config, save_config
from ctrscale.data.loader import ParquetBatchLoader
from ctrscale.data.schema import TRUE_PROBABILITY, write_json_atomic
from ctrscale.distributed.context import DistContext, init_distributed
from ctrscale.errors import CtrscaleError
from ctrscale.train import checkpoint
from ctrscale.train.evaluate import EvalResult, evaluate
from ctrscale.train.metrics_log import MetricsLog
from ctrscale.train.step import Trainer, build_trainer


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    rows_seen: int = 0


def make_loaders(config: Config, ctx: DistContext) -> tuple[ParquetBatchLoader, ParquetBatchLoader]:
    data = config.data
    if data.batch_size % ctx.world_size:
        raise CtrscaleError(
            f"data.batch_size={data.batch_size} must be divisible by the world size "
            f"{ctx.world_size} (each rank takes an equal slice of every global batch)"
        )
    seed = config.train.seed
    train = ParquetBatchLoader.from_config(data, "train", ctx.rank, ctx.world_size, seed=seed)
    evaluation = ParquetBatchLoader.from_config(
        data,
        "eval",
        ctx.rank,
        ctx.world_size,
        seed=seed,
        batch_size=data.eval_batch_size - data.eval_batch_size % ctx.world_size,
        # Synthetic data carries the teacher's probabilities: the eval's Bayes-optimal AUC.
        extra_columns=(TRUE_PROBABILITY,) if train.has_column(TRUE_PROBABILITY) else (),
    )
    return train, evaluation


def global_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def train(config: Config, out_dir: str | Path, *, resume: bool = False) -> dict[str, Any]:
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if not resume and (ckpt_dir / checkpoint.LATEST).exists():
        raise CtrscaleError(
            f"{out_dir} already holds a run's checkpoints: pass --resume to continue it, or "
            "choose another --out"
        )
    ctx = init_distributed(config.distributed)
    torch.manual_seed(config.train.seed)
    train_loader, eval_loader = make_loaders(config, ctx)
    steps_per_epoch = train_loader.num_batches()
    if steps_per_epoch == 0:
        raise CtrscaleError(
            f"the training data holds fewer rows than one batch ({config.data.batch_size}); "
            "lower data.batch_size or set data.drop_last=false"
        )
    total_steps = config.train.epochs * steps_per_epoch
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    trainer = build_trainer(
        config,
        ctx,
        train_loader.table_sizes,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )

    progress = Progress()
    if resume and (latest := checkpoint.latest_checkpoint(ckpt_dir)) is not None:
        progress = _restore(latest, trainer, train_loader)
    elif config.train.warm_start:
        warm_start(trainer, config.train.warm_start, config.train.warm_start_optimizer)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.toml")
        write_json_atomic(out_dir / "hyperparameters.json", trainer.hyperparameters.as_dict())
        (out_dir / "plan.txt").write_text(f"{trainer.dmp.plan}\n")

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
        f"hyperparameters at this batch size: {json.dumps(trainer.hyperparameters.as_dict())}"
    )
    last_eval: EvalResult | None = None
    window = {"loss_sum": 0.0, "rows": 0, "steps": 0, "start": time.perf_counter()}
    train_seconds = 0.0

    resumed_mid_epoch = progress.step > 0
    while progress.step < total_steps:
        if not resumed_mid_epoch:
            train_loader.set_epoch(progress.epoch)
        resumed_mid_epoch = False
        for batch in train_loader:
            batch = batch.to(ctx.device)
            global_rows = (
                config.data.batch_size
                if config.data.drop_last
                else int(global_sum([batch.labels.numel()], ctx.device)[0])
            )
            loss_sum = trainer.step(batch, global_rows, progress.step)

            progress.step += 1
            progress.rows_seen += global_rows
            window["loss_sum"] += float(loss_sum)
            window["rows"] += global_rows
            window["steps"] += 1
            if progress.step % config.train.log_every_steps == 0 or progress.step == total_steps:
                train_seconds += _log_window(log, window, progress, trainer, ctx)
            paused = time.perf_counter()
            if config.train.eval_every_steps and progress.step % config.train.eval_every_steps == 0:
                last_eval = _evaluate_and_log(log, trainer, eval_loader, progress)
            if (
                config.train.checkpoint_every_steps
                and progress.step % config.train.checkpoint_every_steps == 0
            ):
                _save(ckpt_dir, trainer, train_loader, progress)
            window["start"] += time.perf_counter() - paused  # rows/s counts training time only
            if progress.step >= total_steps:
                break
        else:
            progress.epoch += 1

    if last_eval is None or last_eval_step(config, progress) != progress.step:
        last_eval = _evaluate_and_log(log, trainer, eval_loader, progress)
    _save(ckpt_dir, trainer, train_loader, progress)
    rows_per_s = progress.rows_seen / train_seconds if train_seconds > 0 else 0.0
    final = {
        **last_eval.as_dict(),
        "steps": progress.step,
        "epochs": progress.step / steps_per_epoch,
        "rows_per_s": rows_per_s,
        "batch_size": config.data.batch_size,
        "world_size": ctx.world_size,
        "device": ctx.device.type,
        "hyperparameters": trainer.hyperparameters.as_dict(),
    }
    if ctx.is_main:
        write_json_atomic(out_dir / "metrics.json", final)
    log.close()
    return final


def last_eval_step(config: Config, progress: Progress) -> int | None:
    every = config.train.eval_every_steps
    return None if not every else progress.step - progress.step % every


def _log_window(
    log: MetricsLog, window: dict[str, float], progress: Progress, trainer: Trainer, ctx
) -> float:
    (loss_sum,) = global_sum([window["loss_sum"]], ctx.device)
    seconds = time.perf_counter() - window["start"]
    rows_per_s = window["rows"] / seconds if seconds > 0 else 0.0
    loss = loss_sum / max(window["rows"], 1)  # rows are already global-batch rows
    log.record(
        "train",
        progress.step,
        {
            "epoch": progress.epoch,
            "loss": loss,
            "rows_per_s": rows_per_s,
            "lr": trainer.learning_rates(),
        },
    )
    log.progress(int(window["steps"]), loss=f"{loss:.4f}", rows_s=f"{rows_per_s:,.0f}")
    window.update(loss_sum=0.0, rows=0, steps=0, start=time.perf_counter())
    return seconds


def _evaluate_and_log(log: MetricsLog, trainer: Trainer, eval_loader, progress) -> EvalResult:
    result = evaluate(trainer.dmp, eval_loader, trainer.ctx.device)
    log.record("eval", progress.step, {"epoch": progress.epoch, **result.as_dict()})
    gap = "" if result.bayes_auc is None else f" (Bayes-optimal {result.bayes_auc:.5f})"
    log.message(
        f"step {progress.step}: eval AUC {result.auc:.5f}{gap}, LogLoss {result.logloss:.5f} "
        f"on {result.rows:,} rows"
    )
    return result


def _save(ckpt_dir: Path, trainer: Trainer, train_loader, progress: Progress) -> None:
    state = {
        "epoch": progress.epoch,
        "rows_seen": progress.rows_seen,
        "loader": train_loader.state_dict(),
        "world_size": trainer.ctx.world_size,
    }
    checkpoint.save_checkpoint(ckpt_dir, progress.step, trainer.state_tensors(), state)


def _load_states(path: Path, trainer: Trainer, with_optimizer: bool) -> dict[str, Any]:
    if with_optimizer:
        trainer.optimizers.combined.init_state()  # materialise lazily created state to load into
    tensors = trainer.state_tensors(with_optimizer)
    state = checkpoint.load_checkpoint(path, tensors)
    trainer.dmp.load_state_dict(tensors["model"])
    if with_optimizer:
        trainer.optimizers.combined.load_state_dict(tensors["optim"])
    return state


def _restore(path: Path, trainer: Trainer, train_loader) -> Progress:
    state = _load_states(path, trainer, with_optimizer=True)
    train_loader.load_state_dict(state["loader"])
    return Progress(step=state["step"], epoch=state["epoch"], rows_seen=state["rows_seen"])


def resolve_checkpoint(path: str | Path) -> Path:
    """A `step-N` checkpoint, or the newest one of a checkpoints directory or run directory."""
    path = Path(path)
    if (path / checkpoint.STATE_FILE).exists():
        return path
    for directory in (path, path / "checkpoints"):
        if (directory / checkpoint.LATEST).exists():
            return checkpoint.latest_checkpoint(directory)
    raise CtrscaleError(f"{path}: not a checkpoint, nor a directory with a `latest` checkpoint")


def warm_start(trainer: Trainer, source: str | Path, with_optimizer: bool) -> None:
    _load_states(resolve_checkpoint(source), trainer, with_optimizer)


def evaluate_checkpoint(config: Config, source: str | Path) -> EvalResult:
    """Exact eval metrics of a saved model on `config`'s eval split (any world size)."""
    ctx = init_distributed(config.distributed)
    _, eval_loader = make_loaders(config, ctx)
    trainer = build_trainer(config, ctx, eval_loader.table_sizes, steps_per_epoch=1, total_steps=1)
    warm_start(trainer, source, with_optimizer=False)
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
