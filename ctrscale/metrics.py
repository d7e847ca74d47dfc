"""Exact binary-classification metrics in plain numpy: ROC AUC with ties, LogLoss.

Evaluation and the synthetic data's Bayes-optimal numbers both need metrics that are exact over
tens of millions of rows: AUC counts tied scores as half a correct pair (Mann–Whitney U with
average ranks) and is computed by sorting, in O(n log n) with integer pair counts; LogLoss is
accumulated in float64 chunk by chunk so memory does not grow with n beyond the inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

# Rows per float64 working chunk of the LogLoss sums: 4M rows = 32 MB per temporary.
_CHUNK_ROWS = 1 << 22


def exact_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """ROC AUC of `scores` for binary `labels`, tied scores counting 1/2 (constant scores → 0.5).

    For every positive, the negatives scored strictly lower count 1 and those scored equal count
    1/2; both counts come from binary searches into the sorted negative scores.
    """
    scores, positive = _checked(scores, labels)
    positive_scores = np.sort(scores[positive])
    negative_scores = np.sort(scores[~positive])
    if positive_scores.size == 0 or negative_scores.size == 0:
        raise ValueError("AUC is undefined when only one class is present in labels")
    below = np.searchsorted(negative_scores, positive_scores, side="left")
    below_or_tied = np.searchsorted(negative_scores, positive_scores, side="right")
    # Twice the Mann–Whitney U, an exact integer: 2·below + tied = below + below_or_tied.
    twice_u = int(below.sum(dtype=np.int64)) + int(below_or_tied.sum(dtype=np.int64))
    return twice_u / (2.0 * positive_scores.size * negative_scores.size)


def auc_from_counts(positives: ArrayLike, negatives: ArrayLike) -> float:
    """Exact AUC from per-score counts: bin k holds the rows of the k-th smallest distinct score.

    The same quantity as `exact_auc` on the rows themselves, for data kept as a histogram.
    """
    positives = np.asarray(positives, dtype=np.int64)
    negatives = np.asarray(negatives, dtype=np.int64)
    if positives.shape != negatives.shape or positives.ndim != 1:
        raise ValueError("positives and negatives must be 1-D count arrays of the same length")
    if (positives < 0).any() or (negatives < 0).any():
        raise ValueError("counts must be non-negative")
    total_positives, total_negatives = int(positives.sum()), int(negatives.sum())
    if total_positives == 0 or total_negatives == 0:
        raise ValueError("AUC is undefined when only one class is present")
    negatives_below = np.cumsum(negatives) - negatives
    twice_u = int((positives * (2 * negatives_below + negatives)).sum())
    return twice_u / (2.0 * total_positives * total_negatives)


def logloss(probabilities: ArrayLike, labels: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities clipped to [eps, 1 - eps]."""
    probabilities, positive = _checked(probabilities, labels)

    def losses(p: np.ndarray, y: np.ndarray) -> np.ndarray:
        p = np.clip(p.astype(np.float64), eps, 1.0 - eps)
        return -np.where(y, np.log(p), np.log1p(-p))

    return _chunked_mean(losses, probabilities, positive)


def logloss_from_logits(logits: ArrayLike, labels: ArrayLike) -> float:
    """Mean binary cross-entropy of sigmoid(logits), without overflow for any logit.

    -log σ(z) = softplus(-z) and -log(1 - σ(z)) = softplus(z), so the loss is softplus(z) - y·z.
    """
    logits, positive = _checked(logits, labels)

    def losses(z: np.ndarray, y: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64)
        return np.logaddexp(0.0, z) - np.where(y, z, 0.0)

    return _chunked_mean(losses, logits, positive)


def logloss_from_counts(
    probabilities: ArrayLike, positives: ArrayLike, negatives: ArrayLike, eps: float = 1e-7
) -> float:
    """LogLoss of rows kept as a histogram: bin k holds rows predicted `probabilities[k]`."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1.0 - eps)
    positives = np.asarray(positives, dtype=np.float64)
    negatives = np.asarray(negatives, dtype=np.float64)
    rows = positives.sum() + negatives.sum()
    if rows == 0:
        raise ValueError("LogLoss of an empty histogram is undefined")
    return float(-(positives @ np.log(p) + negatives @ np.log1p(-p)) / rows)


def _checked(values: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """1-D finite-or-infinite (never NaN) values and a boolean positive mask of equal length."""
    values = np.asarray(values).ravel()
    labels = np.asarray(labels).ravel()
    if values.shape != labels.shape:
        raise ValueError(f"{values.size} scores but {labels.size} labels")
    if values.size == 0:
        raise ValueError("no rows")
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(
        values.dtype, np.complexfloating
    ):
        raise ValueError(f"scores must be real numbers, got dtype {values.dtype}")
    if np.issubdtype(values.dtype, np.floating) and np.isnan(values).any():
        raise ValueError("scores contain NaN")
    if labels.dtype == np.bool_:
        return values, labels
    positive = labels == 1
    if not (positive | (labels == 0)).all():
        raise ValueError("labels must be 0 or 1")
    return values, positive


def _chunked_mean(
    per_row: Callable[[np.ndarray, np.ndarray], np.ndarray], values: np.ndarray, labels: np.ndarray
) -> float:
    total = 0.0
    for start in range(0, values.size, _CHUNK_ROWS):
        stop = start + _CHUNK_ROWS
        total += float(per_row(values[start:stop], labels[start:stop]).sum())
    return total / values.size
