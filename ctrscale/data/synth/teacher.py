"""The planted teacher: how synthetic features are drawn and how they decide the click.

A teacher, drawn from the seed alone, fixes per-feature cardinalities shaped like Criteo
Kaggle's, Zipf-like id frequencies with ids permuted away from their frequency rank, and a
logit made of per-id first-order effects, low-rank field-pair interactions and a small MLP of
the dense features, each part scaled to a target variance and the bias solved for the base
CTR. Dense counts and missing values follow Criteo's shape. Each row's label is
Bernoulli(p_true), so the AUC and LogLoss of p_true itself are the Bayes-optimal numbers a
model can only approach. `Teacher.sample` draws a `Chunk` of such rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from ctrscale.data import schema

# p_true is a multiple of 2^-20 and labels are drawn from exactly that value: it stays the true
# probability, is exact in float32, and a 2^20-bin histogram gives the exact Bayes AUC.
PROBABILITY_GRID = 1 << 20
# Enough rows to fix the bias to ~0.0005 of CTR and the component scales to ~0.5%.
CALIBRATION_ROWS = 1 << 18
# Random streams of a seed: the teacher, its calibration, and (with day and chunk) the rows.
_TEACHER_STREAM, _CALIBRATION_STREAM, ROWS_STREAM = 0, 1, 2


@dataclass(frozen=True)
class TeacherStrengths:
    """How hard the planted problem is; each number's reason is beside it."""

    # Criteo Kaggle's positive rate; the bias is solved numerically so mean p_true hits it.
    base_ctr: float = 0.256
    # Per-feature Zipf exponents: Criteo id counts follow power laws with slopes a little
    # above 1, which leaves a long tail of ids seen a handful of times.
    zipf_exponent_min: float = 1.05
    zipf_exponent_max: float = 1.2
    # Logit variances of the three parts. A Gaussian logit of variance ~1.96 at CTR 0.256 has
    # Bayes AUC ≈ 0.805 and LogLoss ≈ 0.446, the level of good Criteo models. Ids carry most
    # of it (as in Criteo, where the categorical fields dominate), and since per-id effects are
    # independent of frequency, rare ids matter as much per row as frequent ones. Interactions
    # get the share that leaves a first-order model ~2 AUC points short, like LR versus DeepFM
    # on Criteo.
    first_order_variance: float = 1.3
    interaction_variance: float = 0.3
    dense_variance: float = 0.36
    # ~6% of the 325 field pairs interact, each strong enough to be learnable from a few
    # million rows.
    interaction_pairs: int = 20
    # Rank of each field-pair interaction: low-rank like the FM family assumes, and below
    # the embedding sizes (8–16) students use.
    interaction_rank: int = 4
    # Spread (log-sd) of per-feature importance: some fields matter far more than others.
    feature_importance_log_sd: float = 0.5
    # Hidden width of the dense MLP: a smooth nonlinearity, not a memorisation device.
    dense_hidden: int = 16
    # Shared "activity" factor correlating the count features, as Criteo's counts co-vary.
    dense_correlation: float = 0.5


TEACHER = TeacherStrengths()

# Approximate medians and means of Criteo Kaggle's I1..I13; the count model below reproduces
# both with a lognormal: median ≈ exp(μ) - 1.5 and mean/median ≈ exp(σ²/2).
DENSE_MEDIAN_MEAN: tuple[tuple[float, float], ...] = (
    (1, 3.5), (3, 105), (7, 27), (4, 7.3), (2650, 18538), (33, 116), (3, 16),
    (8, 12.5), (38, 106), (0, 0.6), (1, 2.7), (0, 1.0), (4, 8.2),
)  # fmt: skip
# I2 is the one Criteo count with negative values (mostly -1).
DENSE_MINIMUM: tuple[int, ...] = (0, -1, *([0] * 11))

# Features missing together with a rate, roughly as in Criteo Kaggle (the same rows lack
# C3/C4/C12/C16/C21/C24, and so on).
SPARSE_MISSING_GROUPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("C3", "C4", "C12", "C16", "C21", "C24"), 0.034),
    (("C19", "C20", "C25", "C26"), 0.44),
    (("C22",), 0.76),
)
DENSE_MISSING_GROUPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("I1", "I10"), 0.454),
    (("I3", "I4", "I6", "I13"), 0.215),
    (("I5",), 0.026),
    (("I7", "I9", "I11"), 0.043),
    (("I8",), 0.0005),
    (("I12",), 0.766),
)

_NUM_SPARSE = len(schema.SPARSE_FEATURES)
_NUM_DENSE = len(schema.DENSE_FEATURES)


def feature_value_counts(cardinality_scale: float) -> dict[str, int]:
    """Distinct non-missing values per feature: Criteo's scaled, tiny fields kept (up to 3)."""
    return {
        name: max(math.ceil(count * cardinality_scale), min(count, 3))
        for name, count in schema.CRITEO_KAGGLE_CARDINALITIES.items()
    }


@dataclass(frozen=True)
class Chunk:
    """One chunk of rows, feature-major so every column is a contiguous array."""

    ids: np.ndarray  # (26, n) int64, 0 = missing, else 1 … values
    counts: np.ndarray  # (13, n) int64 raw counts as in Criteo TSV
    dense_missing: np.ndarray  # (13, n) bool
    dense: np.ndarray  # (13, n) float32 log1p(max(count, 0)), 0 when missing
    p_grid: np.ndarray  # (n,) int64 p_true · 2^20
    labels: np.ndarray  # (n,) int8

    def head(self, rows: int) -> Chunk:
        return Chunk(*(getattr(self, field.name)[..., :rows] for field in fields(self)))

    @property
    def p_true(self) -> np.ndarray:
        return (self.p_grid / PROBABILITY_GRID).astype(np.float32)


@dataclass(frozen=True)
class Teacher:
    """The planted model: how features are drawn and how they decide the click probability."""

    value_counts: np.ndarray  # (26,) distinct non-missing ids per feature
    zipf_exponents: np.ndarray  # (26,)
    rank_to_id: np.ndarray  # flat int32: frequency rank → id, feature f at rank_offsets[f]
    rank_offsets: np.ndarray  # (26,)
    first_order: np.ndarray  # flat float32: effect of each id (0 = missing) at table_offsets
    table_offsets: np.ndarray  # (26,)
    latents: dict[int, np.ndarray]  # feature → (rank, values + 1) float32 interaction factors
    pairs: tuple[tuple[int, int, np.ndarray], ...]  # (f, g, rank×rank mixing matrix)
    dense_mean: np.ndarray  # (13,) standardisation of the MLP input
    dense_std: np.ndarray
    dense_w1: np.ndarray  # (hidden, 13)
    dense_b1: np.ndarray  # (hidden,)
    dense_w2: np.ndarray  # (hidden,)
    bias: float

    def sample(self, rng: np.random.Generator, rows: int) -> Chunk:
        ids = self._sample_ids(rng, rows)
        counts, dense_missing = sample_dense_counts(rng, rows)
        dense = log1p_transform(counts, dense_missing)
        probability = 1.0 / (1.0 + np.exp(-self.logit(ids, dense)))
        p_grid = np.clip(np.rint(probability * PROBABILITY_GRID), 1, PROBABILITY_GRID - 1)
        p_grid = p_grid.astype(np.int64)
        # An integer uniform below p_grid is an exact Bernoulli(p_grid / 2^20) draw.
        labels = (rng.integers(0, PROBABILITY_GRID, rows) < p_grid).astype(np.int8)
        return Chunk(ids, counts, dense_missing, dense, p_grid, labels)

    def _sample_ids(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        # Inverse CDF of a power law on [1, values + 1), floored: P(rank k) ∝ ∫_k^{k+1} x^-s.
        values = self.value_counts[:, None]
        exponent = 1.0 - self.zipf_exponents[:, None]
        tail = 1.0 - (values + 1.0) ** exponent
        uniform = rng.random((_NUM_SPARSE, rows))
        rank = ((1.0 - uniform * tail) ** (1.0 / exponent)).astype(np.int64) - 1
        np.minimum(rank, values - 1, out=rank)
        ids = np.take(self.rank_to_id, rank + self.rank_offsets[:, None]).astype(np.int64)
        ids[missing_masks(rng, SPARSE_MISSING_GROUPS, schema.SPARSE_FEATURES, rows)] = 0
        return ids

    def logit(self, ids: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """The teacher's logit from exactly the columns a model sees (ids, transformed dense)."""
        return self.bias + self._first_order(ids) + self._interactions(ids) + self._dense(dense)

    def _first_order(self, ids: np.ndarray) -> np.ndarray:
        effects = np.take(self.first_order, ids + self.table_offsets[:, None])
        return effects.sum(axis=0, dtype=np.float64)

    # einsum rather than `@` in the hot path: OpenBLAS's own threads fight the chunk workers
    # for the cores and made generation several times slower on a busy 2-core machine.
    def _interactions(self, ids: np.ndarray) -> np.ndarray:
        factors = {f: np.take(table, ids[f], axis=1) for f, table in self.latents.items()}
        total = np.zeros(ids.shape[1], dtype=np.float64)
        for f, g, mixing in self.pairs:
            mixed = np.einsum("ij,in->jn", mixing, factors[f])
            total += np.einsum("jn,jn->n", mixed, factors[g])
        return total

    def _dense(self, dense: np.ndarray) -> np.ndarray:
        standardized = (dense - self.dense_mean[:, None]) / self.dense_std[:, None]
        hidden = np.einsum("hj,jn->hn", self.dense_w1, standardized) + self.dense_b1[:, None]
        return np.einsum("h,hn->n", self.dense_w2, np.tanh(hidden)).astype(np.float64)

    def describe(self) -> dict[str, Any]:
        """The teacher's parameters that fit in metadata (not its per-id tables)."""
        names = schema.SPARSE_FEATURES
        first_order_std = {
            name: float(self.first_order[start + 1 : start + 1 + count].std())
            for name, start, count in zip(names, self.table_offsets, self.value_counts, strict=True)
        }
        return {
            "strengths": asdict(TEACHER),
            "bias": self.bias,
            "zipf_exponents": dict(zip(names, map(float, self.zipf_exponents), strict=True)),
            "first_order_std": first_order_std,
            "interaction_pairs": [[names[f], names[g]] for f, g, _ in self.pairs],
            "probability_grid": PROBABILITY_GRID,
            "sparse_missing_groups": [[list(g), rate] for g, rate in SPARSE_MISSING_GROUPS],
            "dense_missing_groups": [[list(g), rate] for g, rate in DENSE_MISSING_GROUPS],
        }


def build_teacher(seed: int, cardinality_scale: float) -> Teacher:
    """Draw the teacher from the seed alone, then scale its parts to the target strengths."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_TEACHER_STREAM,)))
    value_counts = np.array(list(feature_value_counts(cardinality_scale).values()))
    table_sizes = value_counts + 1
    zipf_exponents = rng.uniform(TEACHER.zipf_exponent_min, TEACHER.zipf_exponent_max, _NUM_SPARSE)
    rank_to_id = np.concatenate([rng.permutation(v).astype(np.int32) + 1 for v in value_counts])
    # Bigger fields get more weight: rare ids of high-cardinality fields must carry signal.
    importance = np.log1p(value_counts) * rng.lognormal(
        0.0, TEACHER.feature_importance_log_sd, _NUM_SPARSE
    )
    first_order = np.concatenate(
        [
            rng.standard_normal(size, dtype=np.float32) * np.float32(math.sqrt(weight))
            for size, weight in zip(table_sizes, importance / importance.sum(), strict=True)
        ]
    )
    pairs = _draw_pairs(rng)
    rank = TEACHER.interaction_rank
    latents = {
        f: rng.standard_normal((rank, table_sizes[f]), dtype=np.float32)
        for f in sorted({f for f, _, _ in pairs} | {g for _, g, _ in pairs})
    }
    hidden = TEACHER.dense_hidden
    raw = Teacher(
        value_counts=value_counts,
        zipf_exponents=zipf_exponents,
        rank_to_id=rank_to_id,
        rank_offsets=np.concatenate([[0], np.cumsum(value_counts)[:-1]]),
        first_order=first_order,
        table_offsets=np.concatenate([[0], np.cumsum(table_sizes)[:-1]]),
        latents=latents,
        pairs=pairs,
        dense_mean=np.zeros(_NUM_DENSE, dtype=np.float32),
        dense_std=np.ones(_NUM_DENSE, dtype=np.float32),
        dense_w1=rng.standard_normal((hidden, _NUM_DENSE), dtype=np.float32)
        / np.float32(math.sqrt(_NUM_DENSE)),
        dense_b1=rng.standard_normal(hidden, dtype=np.float32) * np.float32(0.5),
        dense_w2=rng.standard_normal(hidden, dtype=np.float32),
        bias=0.0,
    )
    return _calibrated(raw, seed)


def _draw_pairs(rng: np.random.Generator) -> tuple[tuple[int, int, np.ndarray], ...]:
    candidates = [(f, g) for f in range(_NUM_SPARSE) for g in range(f + 1, _NUM_SPARSE)]
    chosen = rng.choice(len(candidates), TEACHER.interaction_pairs, replace=False)
    rank = TEACHER.interaction_rank
    return tuple(
        (*candidates[c], rng.standard_normal((rank, rank), dtype=np.float32) / np.float32(rank))
        for c in sorted(chosen)
    )


def _calibrated(raw: Teacher, seed: int) -> Teacher:
    """Scale each logit part to its target variance and solve the bias for the base CTR.

    Measured on a sample from the teacher's own random stream, so it is part of the teacher.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_CALIBRATION_STREAM,)))
    ids = raw._sample_ids(rng, CALIBRATION_ROWS)
    counts, dense_missing = sample_dense_counts(rng, CALIBRATION_ROWS)
    dense = log1p_transform(counts, dense_missing)
    mean, std = dense.mean(axis=1), dense.std(axis=1) + np.float32(1e-6)
    standardized = replace(raw, dense_mean=mean, dense_std=std)

    def scale(part: np.ndarray, variance: float) -> np.float32:
        return np.float32(math.sqrt(variance / part.var()))

    first_order_scale = scale(standardized._first_order(ids), TEACHER.first_order_variance)
    interaction_scale = scale(standardized._interactions(ids), TEACHER.interaction_variance)
    dense_scale = scale(standardized._dense(dense), TEACHER.dense_variance)
    scaled = replace(
        standardized,
        first_order=standardized.first_order * first_order_scale,
        pairs=tuple((f, g, mixing * interaction_scale) for f, g, mixing in standardized.pairs),
        dense_w2=standardized.dense_w2 * dense_scale,
    )
    return replace(scaled, bias=_bias_for_ctr(scaled.logit(ids, dense), TEACHER.base_ctr))


def _bias_for_ctr(logits: np.ndarray, ctr: float) -> float:
    """The shift b with mean(sigmoid(logits + b)) = ctr, by bisection (monotone in b)."""
    low, high = -20.0, 20.0
    for _ in range(60):
        middle = (low + high) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logits + middle)))) > ctr:
            high = middle
        else:
            low = middle
    return (low + high) / 2


def sample_dense_counts(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    median, mean = np.array(DENSE_MEDIAN_MEAN, dtype=np.float32).T
    log_location = np.log(median + np.float32(1.5))
    log_sd = np.sqrt(2.0 * np.log((mean + np.float32(1.5)) / (median + np.float32(1.5))))
    rho = np.float32(TEACHER.dense_correlation)
    shared = rng.standard_normal(rows, dtype=np.float32)
    own = rng.standard_normal((_NUM_DENSE, rows), dtype=np.float32)
    normal = rho * shared + np.sqrt(1 - rho * rho) * own
    lognormal = np.exp(log_location[:, None] + log_sd[:, None] * normal)
    counts = np.floor(lognormal).astype(np.int64) - 1
    np.maximum(counts, np.array(DENSE_MINIMUM)[:, None], out=counts)
    return counts, missing_masks(rng, DENSE_MISSING_GROUPS, schema.DENSE_FEATURES, rows)


def log1p_transform(counts: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """prepare's default: log(1 + max(x, 0)) in float64, stored as float32; missing → 0."""
    dense = np.log1p(np.maximum(counts, 0)).astype(np.float32)
    dense[missing] = 0.0
    return dense


def missing_masks(
    rng: np.random.Generator,
    groups: tuple[tuple[tuple[str, ...], float], ...],
    names: tuple[str, ...],
    rows: int,
) -> np.ndarray:
    missing = np.zeros((len(names), rows), dtype=bool)
    for features, rate in groups:
        absent = rng.random(rows, dtype=np.float32) < rate
        for name in features:
            missing[names.index(name)] = absent
    return missing
