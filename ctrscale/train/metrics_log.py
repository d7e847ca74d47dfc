"""Where a run reports: JSON lines (`metrics.jsonl`, strict JSON: a non-finite number is
written as null), a progress bar and the tracking sinks (TensorBoard, MLflow), all on rank 0;
and the training window that decides when a training record is due and stops a diverged run."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from ctrscale.distributed.context import global_sum
from ctrscale.errors import TrainingDiverged
from ctrscale.files import finite_or_none, write_text_atomic
from ctrscale.train.tracking import METRICS_FILE, Sink, numbers


def drop_records_after(path: Path, step: int) -> None:
    """Forget the records a killed run wrote after its last checkpoint (step `step`), so that
    a resumed run does not log those steps twice."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


class MetricsLog:
    """Records to `metrics.jsonl` and every sink (TensorBoard, MLflow: tracking.py)."""

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        sinks: Sequence[Sink] = (),
    ) -> None:
        self.enabled = enabled
        self._file = None
        self._bar = None
        self._sinks = sinks
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        drop_records_after(out_dir / METRICS_FILE, start_step)
        self._file = open(out_dir / METRICS_FILE, "a")  # noqa: SIM115 - lives as long as the run
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(finite_or_none(line), allow_nan=False) + "\n")
        self._file.flush()
        scalars = {name: value for name, value in numbers(kind, values) if math.isfinite(value)}
        for sink in self._sinks:
            sink.scalars(step, scalars)

    def progress(self, steps: int, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        """A line for the user on stderr, above the progress bar (stdout carries only a
        command's result)."""
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()


class Reporting(Protocol):
    """What a training record asks the trainer for."""

    def learning_rates(self) -> dict[str, float]: ...

    def clip_counts(self) -> tuple[Any, Any]: ...


class TrainingWindow:
    """Loss and throughput since the last training record; writes one every `every` steps
    and at the last step. Rows/s counts training time only: `paused()` wraps evaluation and
    checkpointing. The loss sum stays a tensor between records, so a step never waits for it.
    """

    def __init__(self, log: MetricsLog, every: int, total_steps: int, device: torch.device) -> None:
        self.log = log
        self.every = every
        self.total_steps = total_steps
        self.device = device
        self.train_seconds = 0.0
        self.trained_rows = 0  # by this process: a resumed run's rows/s is its own
        self.last_loss = math.inf  # of the last record
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.rows = 0
        self.steps = 0
        self.start = time.perf_counter()

    def after_step(
        self, step: int, epoch: int, loss_sum: torch.Tensor, rows: int, trainer: Reporting
    ) -> None:
        self.loss_sum += loss_sum
        self.rows += rows
        self.steps += 1
        if step % self.every == 0 or step == self.total_steps:
            self._record(step, epoch, trainer)

    def _record(self, step: int, epoch: int, trainer: Reporting) -> None:
        clipped, seen = trainer.clip_counts()
        loss_sum, clipped, seen = global_sum([self.loss_sum, clipped, seen], self.device)
        seconds = time.perf_counter() - self.start
        rows_per_s = self.rows / seconds if seconds > 0 else 0.0
        loss = loss_sum / max(self.rows, 1)  # rows are already global-batch rows
        values = {"epoch": epoch, "loss": loss, "rows_per_s": rows_per_s}
        values["lr"] = learning_rates = trainer.learning_rates()
        if seen:  # the share of the window's (id, step) pairs whose gradient CowClip shrank
            values["cowclip_clipped_fraction"] = clipped / seen
        self.log.record("train", step, values)
        self.last_loss = loss
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss became {loss} between steps {step - self.steps + 1} and "
                f"{step}; stopped without saving (the last checkpoint is the last good model); "
                f"lower the learning rates ({learning_rates})"
            )
        self.log.progress(self.steps, loss=f"{loss:.4f}", rows_s=f"{rows_per_s:,.0f}")
        self.train_seconds += seconds
        self.trained_rows += self.rows
        self._reset()

    def loss_below(self, threshold: float | None) -> bool:
        """Whether the last record's mean training loss is below `threshold` (if any)."""
        return threshold is not None and self.last_loss < threshold

    def rows_per_s(self) -> float:
        """Global rows per second of training time over this process's recorded windows."""
        return self.trained_rows / self.train_seconds if self.train_seconds > 0 else 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - paused
