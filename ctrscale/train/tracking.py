"""Where a run's numbers go besides `metrics.jsonl`: TensorBoard and MLflow sinks, and the
loss/AUC-versus-step plot every run directory gets.

A sink takes a record's numbers flattened to `kind/key[/sub]` names (`train/loss`,
`eval/auc`, `train/lr/dense`). MLflow is optional (`pip install ctrscale[mlflow]`) and on when
`tracking.mlflow_uri` is set: the run logs its resolved configuration and scaled
hyperparameters as parameters, every record as metrics, and its config, plan, hyperparameters,
metrics and plot as artifacts. The MLflow run id is kept in the run directory, so a resumed
run continues its MLflow run. A run started by a sweep or the daily refresh is that job's
child run: the job passes its own run id (and the child's name) in the environment.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from ctrscale.config import Config, TrackingConfig
from ctrscale.errors import CtrscaleError
from ctrscale.files import write_bytes_atomic, write_text_atomic

PARENT_RUN_ENV = "CTRSCALE_MLFLOW_PARENT_RUN_ID"
RUN_NAME_ENV = "CTRSCALE_MLFLOW_RUN_NAME"
RUN_ID_FILE = "mlflow_run_id"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# What a finished run directory holds that is worth keeping next to its MLflow run.
# Metric batches in flight before the oldest half is waited for.
MAX_PENDING = 64
ARTIFACTS = ("config.toml", "plan.txt", "hyperparameters.json", "metrics.json", CURVES_FILE)


def numbers(kind: str, values: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """A record's numbers as (`kind/key[/sub]`, value); other values are skipped."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from numbers(f"{kind}/{key}", value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{kind}/{key}", float(value)


# MLflow names allow only alphanumerics, _ - . space : / — frequency buckets are named "<5",
# "5–99", "≥100".
_MLFLOW_SPELLING = str.maketrans({"<": "lt", ">": "gt", "≥": "ge", "≤": "le", "–": "-"})


def mlflow_name(name: str) -> str:
    return re.sub(r"[^\w\-. :/]", "_", name.translate(_MLFLOW_SPELLING))


def flat_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as `section.key` → text, MLflow's parameter form."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_settings(value, f"{name}."))
        else:
            flat[name] = json.dumps(value)
    return flat


class Sink(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    def __init__(self, out_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise CtrscaleError(
                "train.tensorboard=true needs the `tensorboard` package "
                "(pip install 'ctrscale[tensorboard]')"
            ) from None
        self._writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        self._writer.close()


def import_mlflow():
    try:
        import mlflow
    except ImportError:
        raise CtrscaleError(
            "tracking.mlflow_uri is set but MLflow is not installed "
            "(pip install 'ctrscale[mlflow]')"
        ) from None
    return mlflow


class MlflowSink:
    """One MLflow run per run directory (resumed runs continue it), a child run when a job
    started it."""

    def __init__(self, tracking: TrackingConfig, out_dir: Path, params: dict[str, Any]) -> None:
        mlflow = import_mlflow()
        out_dir.mkdir(parents=True, exist_ok=True)
        self._client = mlflow.MlflowClient(tracking_uri=tracking.mlflow_uri)
        self._pending: list = []  # asynchronous metric batches not known to be logged yet
        self._out_dir = out_dir
        id_file = out_dir / RUN_ID_FILE
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self._client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self._client.get_experiment_by_name(tracking.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._client.create_experiment(tracking.experiment)
        )
        tags = {"ctrscale.run_dir": str(out_dir.resolve())}
        if parent := os.environ.get(PARENT_RUN_ENV):
            tags["mlflow.parentRunId"] = parent
        name = os.environ.get(RUN_NAME_ENV) or tracking.run_name or out_dir.name
        run = self._client.create_run(experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        write_text_atomic(id_file, self.run_id + "\n")
        self.log_params(params)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit per batch
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(name), value, now, step) for name, value in values.items()]
        if metrics:
            # Asynchronous: rank 0 would otherwise wait on the tracking server inside the
            # training loop (and the other ranks for rank 0 at the next collective).
            self._pending.append(
                self._client.log_batch(self.run_id, metrics=metrics, synchronous=False)
            )
            if len(self._pending) > MAX_PENDING:
                self._wait(self._pending[: MAX_PENDING // 2])

    def _wait(self, operations: list) -> None:
        """Block until `operations` are logged (raising what failed), and forget them."""
        for operation in operations:
            operation.wait()
        del self._pending[: len(operations)]

    def finish(self, status: str = "FINISHED", artifacts: Sequence[str] = ARTIFACTS) -> None:
        """Upload the files `artifacts` names in the run directory and close the run."""
        self._wait(list(self._pending))
        for name in artifacts:
            if (self._out_dir / name).exists():
                self._client.log_artifact(self.run_id, str(self._out_dir / name))
        self._client.set_terminated(self.run_id, status=status)

    def child_environment(self, name: str) -> dict[str, str]:
        """What a `ctrscale train` started by this run's job needs to be its child run."""
        return {PARENT_RUN_ENV: self.run_id, RUN_NAME_ENV: name}

    def close(self) -> None:
        """Nothing to release; the run's status is set by `finish` (or stays RUNNING for a
        killed run, which resumes into it)."""


@contextlib.contextmanager
def tracked_run(
    config: Config, out_dir: Path, enabled: bool, hyperparameters: dict[str, Any]
) -> Iterator[list[Sink]]:
    """The run's sinks (none on ranks other than 0). MLflow's parameters are the resolved
    config and `hyperparameters` (the values scaled to this batch size). When the run ends the
    loss/AUC plot is drawn from `metrics.jsonl` and MLflow gets the artifacts and FINISHED, or
    FAILED if it raised."""
    sinks: list[Sink] = []
    if enabled and config.train.tensorboard:
        sinks.append(TensorBoardSink(out_dir))
    if enabled and config.tracking.mlflow_uri:
        params = flat_settings(config.model_dump(mode="json", exclude={"bench"}))
        params |= flat_settings({"scaled": hyperparameters})
        sinks.append(MlflowSink(config.tracking, out_dir, params))
    mlflow = next((sink for sink in sinks if isinstance(sink, MlflowSink)), None)
    try:
        yield sinks
    except BaseException:
        if mlflow is not None:
            mlflow.finish("FAILED")
        raise
    else:
        if enabled and (out_dir / METRICS_FILE).exists():
            plot_curves(out_dir / METRICS_FILE, out_dir / CURVES_FILE)
        if mlflow is not None:
            mlflow.finish()
    finally:
        for sink in sinks:
            sink.close()


@contextlib.contextmanager
def child_runs_of(parent: MlflowSink | None, name: str) -> Iterator[None]:
    """Runs started inside (in this process or its children) are `parent`'s child `name`."""
    if parent is None:
        yield
        return
    saved = {key: os.environ.get(key) for key in (PARENT_RUN_ENV, RUN_NAME_ENV)}
    os.environ.update(parent.child_environment(name))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def plot_curves(metrics_file: Path, out: Path) -> None:
    """Training loss and eval AUC against the step, from a run's `metrics.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and r.get("loss")]
    evals = [(r["step"], r["auc"]) for r in records if r["kind"] == "eval" and r.get("auc")]
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        loss_axis.plot(*zip(*train, strict=True), color="tab:blue")
    loss_axis.set(xlabel="step", ylabel="training loss (LogLoss)", title="training loss")
    if evals:
        auc_axis.plot(*zip(*evals, strict=True), marker="o", color="tab:green")
    auc_axis.set(xlabel="step", ylabel="eval AUC", title="eval AUC")
    for axis in (loss_axis, auc_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    plt.close(figure)
    write_bytes_atomic(out, image.getvalue())
