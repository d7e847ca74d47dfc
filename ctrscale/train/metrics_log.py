"""Where a run reports: JSON lines (`metrics.jsonl`), a progress bar and optional TensorBoard,
all on rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ctrscale.errors import CtrscaleError


class MetricsLog:
    def __init__(
        self, out_dir: Path, *, enabled: bool, total_steps: int, start_step: int, tensorboard: bool
    ) -> None:
        self.enabled = enabled
        self._file = None
        self._bar = None
        self._writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115 - lives as long as the run
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise CtrscaleError(
                    "train.tensorboard=true needs the `tensorboard` package "
                    "(pip install tensorboard)"
                ) from None
            self._writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
                elif isinstance(value, dict):
                    for sub, number in value.items():
                        self._writer.add_scalar(f"{kind}/{key}/{sub}", number, step)

    def progress(self, steps: int, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
