"""The `ctrscale train` and `ctrscale evaluate` commands: the configuration a command runs
with (the user's settings over the defaults, a resumed run's saved config, or a checkpoint's),
and what it prints and writes besides the training loop's own files."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ctrscale.choices import ClipMode
from ctrscale.config import (
    Config,
    ConfigError,
    UserSettings,
    build_config,
    config_to_toml,
    differences,
    load_config,
    user_settings,
)
from ctrscale.data.loader import ParquetBatchLoader
from ctrscale.distributed.context import init_distributed, is_main_process
from ctrscale.errors import CtrscaleError
from ctrscale.files import finite_or_none, write_json_atomic
from ctrscale.optim.embedding.update import EmbeddingUpdate, clip_floor
from ctrscale.optim.scaling import resolve_hyperparameters, scaled
from ctrscale.storage import is_uri
from ctrscale.train.checkpoint import (
    CONFIG_FILE,
    MODEL_KEYS,
    STATE_FILE,
    checkpoint_config,
    load_into,
    resolve_checkpoint,
)
from ctrscale.train.checkpoint_mirror import CheckpointMirror, fetch_checkpoint
from ctrscale.train.evaluate import evaluate
from ctrscale.train.loop import (
    CONFIG_TOML,
    check_ids_fit,
    id_frequency,
    make_loaders,
    step_budget,
    train,
)
from ctrscale.train.step import build_trainer


def evaluate_checkpoint(settings: UserSettings, source: str | Path) -> dict[str, Any]:
    """Exact eval metrics of a saved model (any world size), also one in an object store
    (each rank downloads it: nodes need not share a filesystem)."""
    if is_uri(source):
        with tempfile.TemporaryDirectory(prefix="ctrscale-evaluate-") as directory:
            result = _evaluate_path(settings, fetch_checkpoint(str(source), Path(directory)))
        return {**result, "checkpoint": str(source)}
    return _evaluate_path(settings, resolve_checkpoint(source))


def _evaluate_path(settings: UserSettings, path: Path) -> dict[str, Any]:
    """The configuration is the one the checkpoint was trained with, with the user's settings
    laid over it; a model setting that differs from the checkpoint's is an error naming it."""
    saved = checkpoint_config(path)
    config = build_config(settings, base=saved)
    if changed := differences(saved, config, MODEL_KEYS):
        raise ConfigError(
            f"{path} holds a model trained with other settings; evaluate takes the model from "
            f"the checkpoint, so leave these out: {'; '.join(changed)}"
        )
    ctx = init_distributed(config.distributed)
    train_loader, eval_loader = make_loaders(config, ctx)
    table_sizes = json.loads((path / STATE_FILE).read_text())["table_sizes"]
    check_ids_fit(eval_loader, table_sizes, "the checkpoint's model")
    trainer = build_trainer(config, ctx, table_sizes, steps_per_epoch=1, total_steps=1)
    state = load_into(trainer, path, with_optimizer=False)
    frequency = id_frequency(config, train_loader, ctx)
    result = evaluate(trainer.dmp, eval_loader, ctx.device, frequency, trainer.precision)
    return {"checkpoint": str(path), "step": state["step"], **result.as_dict()}


def run_evaluate_cli(args) -> int:
    result = evaluate_checkpoint(user_settings(args.config, args.overrides), args.checkpoint)
    if is_main_process():
        stored = is_uri(result["checkpoint"])  # nothing is written into an object store
        default = (
            None if stored else default_evaluation_file(Path(result["checkpoint"]), result["step"])
        )
        out = args.out or default
        if out is not None:
            write_json_atomic(out, finite_or_none(result))
            result["written_to"] = str(out)
        print(json.dumps(finite_or_none(result)))
    return 0


def default_evaluation_file(checkpoint: Path, step: int) -> Path | None:
    """`RUN/evaluate-step-N.json` for a checkpoint of a training run's `checkpoints/`; other
    checkpoints (a published model) are not written into: the result is only printed."""
    if checkpoint.parent.name != "checkpoints":
        return None
    return checkpoint.parent.parent / f"evaluate-step-{step}.json"


# Settings that may change when a run resumes: how long it runs (a cosine decay then follows
# the new total), how it reports and where it runs.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.epochs",
    "train.log_every_steps",
    "train.eval_every_steps",
    "train.checkpoint_every_steps",
    "train.tensorboard",
    "tracking.",
    "data.prefetch_batches",
    "distributed.",
)


def resumed_config(settings: UserSettings, out_dir: Path, allow_changes: bool) -> Config:
    """The run's saved config with the user's settings over it; a changed hyperparameter is an
    error unless `allow_changes`."""
    saved_path = out_dir / CONFIG_TOML
    if saved_path.exists():
        saved = load_config(saved_path)
    elif (stored := config_in_checkpoint_store(build_config(settings))) is not None:
        saved = stored  # a new machine: the run directory is empty, the store has the run
    else:
        raise CtrscaleError(f"--resume: {out_dir} holds no run to resume (no {CONFIG_TOML})")
    config = build_config(settings, base=saved)
    changed = [d for d in differences(saved, config) if not d.startswith(RESUMABLE_CHANGES)]
    if changed and not allow_changes:
        raise ConfigError(
            f"--resume would change the run in {out_dir}: {'; '.join(changed)} (saved → now); "
            "resume with the saved settings, or pass --allow-config-change"
        )
    return config


def config_in_checkpoint_store(config: Config) -> Config | None:
    """The config of the latest checkpoint in `train.checkpoint_uri`, if it has one."""
    if not config.train.checkpoint_uri:
        return None
    mirror = CheckpointMirror(config.train.checkpoint_uri)
    name = mirror.latest()
    text = None if name is None else mirror.read_bytes(name, CONFIG_FILE)
    if text is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / CONFIG_FILE
        path.write_bytes(text)
        return load_config(path)


def run_cli(args) -> int:
    settings = user_settings(args.config, args.overrides)
    out_dir = Path(args.out)
    if args.resume:
        config = resumed_config(settings, out_dir, args.allow_config_change)
    else:
        config = build_config(settings)
    if args.print_config:
        print_config(config)
        return 0
    metrics = train(config, out_dir, resume=args.resume)
    if is_main_process():
        summary = {k: metrics[k] for k in ("auc", "logloss", "bayes_auc", "steps", "rows_per_s")}
        print(json.dumps(finite_or_none(summary)))
    return 0


def print_config(config: Config) -> None:
    """The resolved configuration and the hyperparameters at its batch size, without training
    (reads the training data's metadata for the number of steps an epoch has)."""
    loader = ParquetBatchLoader.from_config(config.data, "train", 0, 1, seed=config.train.seed)
    steps_per_epoch, total_steps = step_budget(config, loader)
    hyperparameters = resolve_hyperparameters(config, steps_per_epoch, total_steps)
    optim = scaled(config.optim, hyperparameters)
    embedding = EmbeddingUpdate(
        optim.embedding, optim.cowclip, config.distributed.sharding_type, torch.device("cpu")
    ).describe()
    if config.optim.cowclip.mode == ClipMode.PAPER:
        dim = config.model.embedding_dim
        embedding["cowclip"]["zeta"] = {str(dim): clip_floor(config.optim.cowclip, dim)}
    print(config_to_toml(config))
    print("# at this batch size (hyperparameters.json):")
    described = {
        **hyperparameters.as_dict(),
        "steps_per_epoch": steps_per_epoch,
        "embedding": embedding,
        "dense": {
            "optimizer": optim.dense.name.value,
            "lr": optim.dense.lr,
            "transform": optim.dense.transform.value,
        },
    }
    print(json.dumps(described, indent=2))
