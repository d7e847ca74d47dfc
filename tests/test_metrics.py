"""Exact AUC and LogLoss against brute force and hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctrscale import metrics


def pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """O(n²) definition: over all (positive, negative) pairs, 1 if ordered right, 1/2 if tied."""
    positives = scores[labels == 1][:, None]
    negatives = scores[labels == 0][None, :]
    wins = (positives > negatives).sum() + 0.5 * (positives == negatives).sum()
    return float(wins / (positives.size * negatives.size))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_auc_matches_brute_force_with_heavy_ties(seed: int, dtype: type) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(700) < 0.3).astype(np.int8)
    # Eight distinct values for 700 rows: almost every pair is tied or cross-tied.
    scores = (rng.integers(0, 8, 700) + labels * rng.integers(0, 3, 700)).astype(dtype)
    assert metrics.exact_auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels), 1e-12)


def test_auc_matches_brute_force_without_ties() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 500)
    scores = rng.standard_normal(500) + labels
    assert metrics.exact_auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels), 1e-12)


def test_constant_scores_give_exactly_one_half() -> None:
    labels = np.array([0, 1, 1, 0, 1, 0, 0])
    assert metrics.exact_auc(np.full(7, 0.3, dtype=np.float32), labels) == 0.5


def test_negative_and_positive_zero_are_tied() -> None:
    assert metrics.exact_auc(np.array([-0.0, 0.0]), np.array([1, 0])) == 0.5


def test_perfect_and_reversed_orderings() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert metrics.exact_auc(scores, labels) == 1.0
    assert metrics.exact_auc(-scores, labels) == 0.0


def test_boolean_labels_are_accepted() -> None:
    labels = np.array([False, True, False, True])
    assert metrics.exact_auc(np.array([0.1, 0.9, 0.4, 0.3]), labels) == 0.75


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, 0.2], [1, 1], "only one class"),
        ([0.1, 0.2], [0, 0], "only one class"),
        ([0.1, 0.2], [0, 2], "0 or 1"),
        ([0.1, float("nan")], [0, 1], "NaN"),
        ([0.1, 0.2, 0.3], [0, 1], "3 scores but 2 labels"),
        ([], [], "no rows"),
    ],
)
def test_auc_rejects_bad_input(scores: list, labels: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.exact_auc(np.array(scores, dtype=np.float64), np.array(labels))


def test_auc_from_counts_equals_auc_of_the_rows() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 2_000)
    scores = rng.integers(0, 50, 2_000) / 50
    values, where = np.unique(scores, return_inverse=True)
    positives = np.bincount(where, weights=labels, minlength=values.size).astype(np.int64)
    negatives = np.bincount(where, minlength=values.size) - positives
    assert metrics.auc_from_counts(positives, negatives) == pytest.approx(
        metrics.exact_auc(scores, labels), 1e-12
    )


def test_auc_from_counts_rejects_a_single_class() -> None:
    with pytest.raises(ValueError, match="one class"):
        metrics.auc_from_counts([3, 0], [0, 0])


def test_logloss_by_hand() -> None:
    expected = -(math.log(0.9) + math.log(1 - 0.2) + math.log(0.6)) / 3
    assert metrics.logloss([0.9, 0.2, 0.6], [1, 0, 1]) == pytest.approx(expected, 1e-12)


def test_logloss_clips_certain_mistakes() -> None:
    assert metrics.logloss([0.0, 1.0], [1, 0]) == pytest.approx(-math.log(1e-7), 1e-9)
    assert metrics.logloss([0.0], [1], eps=1e-3) == pytest.approx(-math.log(1e-3), 1e-9)


def test_logloss_from_logits_equals_logloss_of_sigmoid() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, 1_000)
    labels = rng.integers(0, 2, 1_000)
    probabilities = 1 / (1 + np.exp(-logits))
    assert metrics.logloss_from_logits(logits, labels) == pytest.approx(
        metrics.logloss(probabilities, labels), 1e-9
    )


def test_logloss_from_logits_is_exact_for_extreme_logits() -> None:
    logits = np.array([1000.0, -1000.0, 1000.0, -1000.0], dtype=np.float32)
    labels = np.array([0, 1, 1, 0])
    # Two losses of 1000 (confidently wrong) and two of 0 (confidently right).
    assert metrics.logloss_from_logits(logits, labels) == pytest.approx(500.0, 1e-12)


def test_logloss_from_counts_equals_logloss_of_the_rows() -> None:
    probabilities = np.array([0.1, 0.5, 0.8])
    positives, negatives = np.array([1, 2, 7]), np.array([9, 2, 3])
    rows_p = np.repeat(probabilities, positives + negatives)
    rows_y = np.concatenate([[1] * p + [0] * n for p, n in zip(positives, negatives, strict=True)])
    assert metrics.logloss_from_counts(probabilities, positives, negatives) == pytest.approx(
        metrics.logloss(rows_p, rows_y), 1e-12
    )


def test_chunked_sums_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    probabilities, labels = rng.random(1_001), rng.integers(0, 2, 1_001)
    whole = metrics.logloss(probabilities, labels)
    monkeypatch.setattr(metrics, "_CHUNK_ROWS", 64)
    assert metrics.logloss(probabilities, labels) == pytest.approx(whole, 1e-12)
