"""Exact evaluation over a whole held-out split, gathered across ranks.

TorchRec's AUC metric is windowed and not tie-aware, so evaluation here collects every
prediction of every rank and computes the exact, tie-aware AUC and the LogLoss once. For
synthetic data, the teacher's true probabilities of the same rows give the Bayes-optimal AUC.
With an `IdFrequency`, the same metrics per bucket of each row's rarest id (frequency.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ctrscale.data.schema import TRUE_PROBABILITY
from ctrscale.errors import TrainingDiverged
from ctrscale.metrics import exact_auc, logloss, logloss_from_logits
from ctrscale.train.frequency import IdFrequency
from ctrscale.train.precision import forward_logits


@dataclass(frozen=True)
class EvalResult:
    auc: float | None  # None: one class only (possible in a small frequency bucket)
    logloss: float
    rows: int
    positives: int
    bayes_auc: float | None = None
    bayes_logloss: float | None = None
    buckets: dict[str, EvalResult] | None = None  # by rarest-id frequency bucket

    @property
    def bayes_auc_gap(self) -> float | None:
        if self.bayes_auc is None or self.auc is None:
            return None
        return self.bayes_auc - self.auc

    def as_dict(self) -> dict[str, Any]:
        result = {**asdict(self), "bayes_auc_gap": self.bayes_auc_gap}
        result.pop("buckets")
        if self.buckets is not None:
            result["buckets"] = {label: b.as_dict() for label, b in self.buckets.items()}
        return result


def scores(
    logits: np.ndarray, labels: np.ndarray, truth: np.ndarray | None
) -> dict[str, float | int | None]:
    """AUC, LogLoss, rows, positives (and the Bayes-optimal ones from the true
    probabilities) of one set of rows."""
    positives = int(labels.sum())
    both_classes = 0 < positives < labels.size
    result: dict[str, float | int | None] = {
        "auc": exact_auc(logits, labels) if both_classes else None,
        "logloss": logloss_from_logits(logits, labels),
        "rows": int(labels.size),
        "positives": positives,
    }
    if truth is not None:
        result["bayes_auc"] = exact_auc(truth, labels) if both_classes else None
        result["bayes_logloss"] = logloss(truth, labels)
    return result


def gather_to_all(local: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    # gloo's all_gather needs equal shapes: gather lengths, pad, trim.
    length = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    lengths = [torch.empty_like(length) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, length)
    longest = int(max(n.item() for n in lengths))
    padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    pieces = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[: int(n.item())] for piece, n in zip(pieces, lengths, strict=True)])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    frequency: IdFrequency | None = None,
    dtype: torch.dtype = torch.float32,
) -> EvalResult:
    """Predict every batch of `batches` (this rank's slices; the dense tower in `dtype`, as it
    trained) and score the gathered whole, and each frequency bucket's rows."""
    was_training = model.training
    model.eval()
    logits, labels, true_probs, buckets = [], [], [], []
    for batch in batches:
        if frequency is not None:
            buckets.append(frequency.buckets(batch.sparse_features).to(device))
        batch = batch.to(device, non_blocking=True)  # from pinned memory on CUDA
        logits.append(forward_logits(model, batch, dtype).flatten())
        labels.append(batch.labels.float().flatten())
        extras = getattr(batch, "extras", None) or {}
        if TRUE_PROBABILITY in extras:
            true_probs.append(extras[TRUE_PROBABILITY].float().flatten())
    model.train(was_training)

    def gathered(parts: list[torch.Tensor]) -> np.ndarray:
        local = torch.cat(parts) if parts else torch.empty(0, device=device)
        return gather_to_all(local).cpu().double().numpy()

    all_logits, all_labels = gathered(logits), gathered(labels)
    if not np.isfinite(all_logits).all():
        raise TrainingDiverged(
            f"{int((~np.isfinite(all_logits)).sum()):,} of {all_logits.size:,} predictions are "
            "not finite: the model diverged (lower the learning rates)"
        )
    has_truth = torch.tensor([float(bool(true_probs))], device=device)
    if dist.is_initialized():
        dist.all_reduce(has_truth, op=dist.ReduceOp.MIN)
    all_truth = gathered(true_probs) if has_truth.item() else None
    result = scores(all_logits, all_labels, all_truth)
    if frequency is None:
        return EvalResult(**result)
    all_buckets = gathered(buckets).astype(np.int64)
    by_bucket = {}
    for index, label in enumerate(frequency.labels):
        rows = all_buckets == index
        truth = None if all_truth is None else all_truth[rows]
        by_bucket[label] = EvalResult(**scores(all_logits[rows], all_labels[rows], truth))
    return EvalResult(**result, buckets=by_bucket)


class PeriodicEvaluator:
    """Scores the model every `every` steps and at the end of a run; `report(step, epoch,
    result)` receives each result. The final evaluation reuses a periodic one made at the
    same step instead of scoring the same model twice."""

    def __init__(
        self,
        batches: Iterable,
        every: int | None,
        device: torch.device,
        report: Callable[[int, int, EvalResult], None],
        frequency: IdFrequency | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.batches = batches
        self.dtype = dtype
        self.every = every
        self.device = device
        self.report = report
        self.frequency = frequency
        self.last: tuple[int, EvalResult] | None = None

    def after_step(self, model: nn.Module, step: int, epoch: int) -> None:
        if self.every and step % self.every == 0:
            self._evaluate(model, step, epoch)

    def final(self, model: nn.Module, step: int, epoch: int) -> EvalResult:
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        return self._evaluate(model, step, epoch)

    def _evaluate(self, model: nn.Module, step: int, epoch: int) -> EvalResult:
        result = evaluate(model, self.batches, self.device, self.frequency, self.dtype)
        self.last = (step, result)
        self.report(step, epoch, result)
        return result
