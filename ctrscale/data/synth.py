"""Synthetic Criteo-like data from a planted teacher, whose true click probability is known.

Owns `ctrscale synth` and `generate()`. A teacher (drawn from the seed alone) fixes per-feature
cardinalities shaped like Criteo Kaggle's, Zipf-like id frequencies with ids permuted away from
their frequency rank, and a logit made of per-id first-order effects, low-rank field-pair
interactions and a small MLP of the dense features. Each row's label is Bernoulli(p_true), so
the AUC and LogLoss of p_true itself are the Bayes-optimal numbers a model can only approach.

Rows are generated in fixed chunks of `CHUNK_ROWS`, each from its own (seed, day, chunk) random
stream, so output is byte-identical for a seed whatever the thread timing, and a longer day is
an extension of a shorter one. Chunks stream to disk; the Bayes metrics come from a histogram
of p_true, which lives on a 2^-20 grid, so memory does not grow with the number of rows.

Layout: `DIR/day=N/part-00000.parquet …` (schema.PARQUET_SCHEMA + `p_true`) or raw Criteo TSV
`DIR/day_N.tsv`; `DIR/_truth/day=N.parquet` holds each day's p_true histogram (the `_` prefix
keeps it out of Parquet dataset discovery) so later runs can add days and recompute "all";
`DIR/metadata.json` records table sizes, the teacher and the per-day Bayes metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ctrscale import metrics
from ctrscale.data import schema
from ctrscale.errors import CtrscaleError
from ctrscale.files import write_json_atomic

GENERATOR = "ctrscale.synth"
CHUNK_ROWS = 131_072  # one random stream and one Parquet row group (the loader's unit)
ROW_GROUPS_PER_FILE = 8  # 1,048,576 rows ≈ 45 MB per part file: several files per large day
TRUTH_DIR = "_truth"
# p_true is a multiple of 2^-20 and labels are drawn from exactly that value: it stays the true
# probability, is exact in float32, and a 2^20-bin histogram gives the exact Bayes AUC.
PROBABILITY_GRID = 1 << 20
# Enough rows to fix the bias to ~0.0005 of CTR and the component scales to ~0.5%.
CALIBRATION_ROWS = 1 << 18
# TSV ids: (id · odd multiplier + per-feature salt) mod 2^32 is a bijection, so distinct
# synthetic ids stay distinct hex values and can be decoded again.
HEX_MULTIPLIER = 0x9E3779B1
_HEX_INVERSE = pow(HEX_MULTIPLIER, -1, 1 << 32)
_HEX_SALT_STEP = 0x85EBCA77
_TEACHER_STREAM, _CALIBRATION_STREAM, _ROWS_STREAM = 0, 1, 2


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

PARQUET_SCHEMA = schema.PARQUET_SCHEMA.append(
    pa.field(schema.TRUE_PROBABILITY, pa.float32(), nullable=False)
)
_NUM_SPARSE = len(schema.SPARSE_FEATURES)
_NUM_DENSE = len(schema.DENSE_FEATURES)


def feature_value_counts(cardinality_scale: float) -> dict[str, int]:
    """Distinct non-missing values per feature: Criteo's scaled, tiny fields kept (up to 3)."""
    return {
        name: max(math.ceil(count * cardinality_scale), min(count, 3))
        for name, count in schema.CRITEO_KAGGLE_CARDINALITIES.items()
    }


def hex_salt(feature: str) -> int:
    """The per-feature offset of the TSV id scramble, so equal ids differ across features."""
    return ((schema.SPARSE_FEATURES.index(feature) + 1) * _HEX_SALT_STEP) % (1 << 32)


def decode_hex_id(feature: str, hex_value: str) -> int:
    """The synthetic id (1 … values) behind a TSV hex field."""
    return ((int(hex_value, 16) - hex_salt(feature)) * _HEX_INVERSE) % (1 << 32)


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
        counts, dense_missing = _sample_dense_counts(rng, rows)
        dense = _log1p_transform(counts, dense_missing)
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
        ids[_missing_masks(rng, SPARSE_MISSING_GROUPS, schema.SPARSE_FEATURES, rows)] = 0
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
    counts, dense_missing = _sample_dense_counts(rng, CALIBRATION_ROWS)
    dense = _log1p_transform(counts, dense_missing)
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


def _sample_dense_counts(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
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
    return counts, _missing_masks(rng, DENSE_MISSING_GROUPS, schema.DENSE_FEATURES, rows)


def _log1p_transform(counts: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """prepare's default: log(1 + max(x, 0)) in float64, stored as float32; missing → 0."""
    dense = np.log1p(np.maximum(counts, 0)).astype(np.float32)
    dense[missing] = 0.0
    return dense


def _missing_masks(
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


def generate(
    out_dir: str | Path,
    rows_per_day: int,
    days: int = 1,
    seed: int = 0,
    cardinality_scale: float = 0.01,
    fmt: str = "parquet",
    first_day: int = 0,
) -> dict[str, Any]:
    """Write days first_day … first_day+days-1 into out_dir and return the updated metadata.

    Generating into a directory made earlier with the same seed, scale and format adds (or
    regenerates) days of the same teacher; their entries are merged into metadata.json and
    "all" is recomputed exactly over every day the directory holds.
    """
    _check_arguments(rows_per_day, days, seed, cardinality_scale, fmt, first_day)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = build_teacher(seed, cardinality_scale)
    metadata = _metadata_to_extend(out, seed, cardinality_scale, fmt, teacher)
    new_days = range(first_day, first_day + days)
    kept_days = [
        int(split.removeprefix("day="))
        for split in metadata["splits"]
        if split.startswith("day=") and int(split.removeprefix("day=")) not in new_days
    ]
    all_counts = sum((_read_truth(out, day) for day in kept_days), _empty_counts())
    workers = _worker_count()
    with ThreadPoolExecutor(workers) as pool:
        for day in new_days:
            chunks = _chunks_in_order(pool, workers + 1, teacher, seed, day, rows_per_day)
            counts = _write_day(out, day, fmt, chunks)
            _write_truth(out, day, counts)
            all_counts += counts
            metadata["splits"][f"day={day}"] = _split_metrics(counts)
            metadata["splits"]["all"] = _split_metrics(all_counts)
            write_json_atomic(out / schema.METADATA_FILE, metadata)
    return metadata


def run_cli(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    metadata = generate(
        args.out,
        rows_per_day=args.rows,
        days=args.days,
        seed=args.seed,
        cardinality_scale=args.cardinality_scale,
        fmt=args.format,
        first_day=args.first_day,
    )
    seconds = time.perf_counter() - started
    print(
        f"ctrscale synth: {args.days} day(s) × {args.rows:,} rows → {args.out} "
        f"({args.format}, seed {args.seed}, cardinality scale {args.cardinality_scale})"
    )
    new_days = [f"day={day}" for day in range(args.first_day, args.first_day + args.days)]
    for split in [*new_days, "all"]:
        entry = metadata["splits"][split]
        auc = "n/a" if entry["bayes_auc"] is None else f"{entry['bayes_auc']:.5f}"
        print(
            f"  {split:<8} rows {entry['rows']:>12,}  CTR {entry['ctr']:.4f}  "
            f"Bayes AUC {auc}  Bayes LogLoss {entry['bayes_logloss']:.5f}"
        )
    rows = args.rows * args.days
    print(f"  {seconds:.1f} s, {rows / seconds:,.0f} rows/s")
    return 0


def _check_arguments(
    rows_per_day: int, days: int, seed: int, cardinality_scale: float, fmt: str, first_day: int
) -> None:
    if rows_per_day < 1:
        raise CtrscaleError(f"--rows must be at least 1, got {rows_per_day}")
    if days < 1:
        raise CtrscaleError(f"--days must be at least 1, got {days}")
    if first_day < 0:
        raise CtrscaleError(f"--first-day must be non-negative, got {first_day}")
    if seed < 0:
        raise CtrscaleError(f"--seed must be non-negative, got {seed}")
    # Above 1 the tables would outgrow Criteo's own; the teacher holds them in memory.
    if not 0 < cardinality_scale <= 1:
        raise CtrscaleError(f"--cardinality-scale must be in (0, 1], got {cardinality_scale}")
    if fmt not in ("parquet", "tsv"):
        raise CtrscaleError(f"--format must be parquet or tsv, got {fmt!r}")


def _metadata_to_extend(
    out: Path, seed: int, cardinality_scale: float, fmt: str, teacher: Teacher
) -> dict[str, Any]:
    """Fresh metadata, or the directory's own when it was made by the same teacher and format."""
    fresh: dict[str, Any] = {
        "version": schema.METADATA_VERSION,
        "generator": GENERATOR,
        "seed": seed,
        "cardinality_scale": cardinality_scale,
        "format": fmt,
        "table_sizes": {
            name: int(count) + 1  # + id 0, reserved for "missing"
            for name, count in zip(schema.SPARSE_FEATURES, teacher.value_counts, strict=True)
        },
        "dense_transform": "log1p" if fmt == "parquet" else "raw",
        "ids": "synthetic" if fmt == "parquet" else "synthetic-hex",
        "teacher": teacher.describe(),
        "splits": {},
    }
    if fmt == "tsv":
        fresh["hex_scramble"] = {
            "formula": "(id * multiplier + salt) mod 2^32",
            "multiplier": HEX_MULTIPLIER,
            "salts": {name: hex_salt(name) for name in schema.SPARSE_FEATURES},
        }
    fresh = _json_roundtrip(fresh)
    path = out / schema.METADATA_FILE
    if not path.exists():
        return fresh
    try:
        existing = schema.read_metadata(out)
    except ValueError as exc:
        raise CtrscaleError(str(exc)) from None
    if existing.get("generator") != GENERATOR:
        raise CtrscaleError(f"{path}: this directory holds a dataset not made by ctrscale synth")
    for key in ("version", "seed", "cardinality_scale", "format", "table_sizes", "teacher"):
        if existing.get(key) != fresh[key]:
            raise CtrscaleError(
                f"{path}: its {key!r} differs from this run's; new days must come from the same "
                "teacher (same seed, --cardinality-scale, --format and ctrscale version)"
            )
    return existing


def _json_roundtrip(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as metadata.json will read back (tuples → lists, numpy → Python)."""
    return json.loads(json.dumps(payload))


def _worker_count() -> int:
    # Past ~4 generators the single Parquet writer is the bottleneck; more only costs memory.
    if hasattr(os, "sched_getaffinity"):
        return min(4, len(os.sched_getaffinity(0)))
    return min(4, os.cpu_count() or 1)


def _chunks_in_order(
    pool: ThreadPoolExecutor, window: int, teacher: Teacher, seed: int, day: int, rows: int
) -> Iterator[Chunk]:
    """The day's chunks in order, generated ahead by the pool but never more than `window`."""
    pending: deque[Future[Chunk]] = deque()
    for index, start in enumerate(range(0, rows, CHUNK_ROWS)):
        size = min(CHUNK_ROWS, rows - start)
        pending.append(pool.submit(_generate_chunk, teacher, seed, day, index, size))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _generate_chunk(teacher: Teacher, seed: int, day: int, index: int, rows: int) -> Chunk:
    stream = np.random.SeedSequence(seed, spawn_key=(_ROWS_STREAM, day, index))
    # Always a whole chunk, then cut: a shorter day is then exactly a prefix of a longer one.
    return teacher.sample(np.random.default_rng(stream), CHUNK_ROWS).head(rows)


def _write_day(out: Path, day: int, fmt: str, chunks: Iterator[Chunk]) -> np.ndarray:
    """Write one day next to its final place, then move it there; returns its truth counts."""
    final = out / (f"day={day}" if fmt == "parquet" else f"day_{day}.tsv")
    partial = out / f".{final.name}.partial"
    _remove(partial)
    counts = _empty_counts()

    def counted(chunk: Chunk) -> Chunk:
        # Flat indices hit np.add.at's fast path; counts is C-ordered (grid, label).
        np.add.at(counts.reshape(-1), 2 * chunk.p_grid + chunk.labels, 1)
        return chunk

    counted_chunks = map(counted, chunks)
    if fmt == "parquet":
        _write_parquet_day(partial, counted_chunks)
    else:
        _write_tsv_day(partial, counted_chunks)
    _remove(final)
    partial.rename(final)
    return counts


def _write_parquet_day(directory: Path, chunks: Iterator[Chunk]) -> None:
    directory.mkdir()
    writer: pq.ParquetWriter | None = None
    try:
        for index, chunk in enumerate(chunks):
            if index % ROW_GROUPS_PER_FILE == 0:
                if writer is not None:
                    writer.close()
                part = directory / f"part-{index // ROW_GROUPS_PER_FILE:05d}.parquet"
                writer = pq.ParquetWriter(part, PARQUET_SCHEMA)
            writer.write_table(_parquet_table(chunk), row_group_size=CHUNK_ROWS)
    finally:
        if writer is not None:
            writer.close()


def _parquet_table(chunk: Chunk) -> pa.Table:
    columns = [
        pa.array(chunk.labels),
        *(pa.array(column) for column in chunk.dense),
        *(pa.array(column) for column in chunk.ids),
        pa.array(chunk.p_true),
    ]
    return pa.Table.from_arrays(columns, schema=PARQUET_SCHEMA)


_TSV_OPTIONS = pa_csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _write_tsv_day(path: Path, chunks: Iterator[Chunk]) -> None:
    writer: pa_csv.CSVWriter | None = None
    try:
        for chunk in chunks:
            table = _tsv_table(chunk)
            if writer is None:
                writer = pa_csv.CSVWriter(path, table.schema, write_options=_TSV_OPTIONS)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def _tsv_table(chunk: Chunk) -> pa.Table:
    """Criteo's raw layout: label, counts (null → empty field), hex ids (null → empty)."""
    columns = [
        pa.array(chunk.labels),
        *(
            pa.array(counts, mask=missing)
            for counts, missing in zip(chunk.counts, chunk.dense_missing, strict=True)
        ),
        *(
            _hex_column(name, ids)
            for name, ids in zip(schema.SPARSE_FEATURES, chunk.ids, strict=True)
        ),
    ]
    return pa.Table.from_arrays(columns, names=list(schema.RAW_COLUMNS))


def _hex_column(feature: str, ids: np.ndarray) -> pa.Array:
    """8 lowercase hex chars of the scrambled id per row, null where the id is missing (0)."""
    scrambled = ids.astype(np.uint64) * np.uint64(HEX_MULTIPLIER) + np.uint64(hex_salt(feature))
    digits = (scrambled & np.uint64(0xFFFFFFFF)).astype(">u4").view(np.uint8).reshape(-1, 4)
    chars = np.empty((ids.size, 8), dtype=np.uint8)
    chars[:, 0::2] = _HEX_DIGITS[digits >> 4]
    chars[:, 1::2] = _HEX_DIGITS[digits & 15]
    offsets = np.arange(0, 8 * ids.size + 1, 8, dtype=np.int32)
    validity = np.packbits(ids != 0, bitorder="little")
    return pa.StringArray.from_buffers(
        ids.size, pa.py_buffer(offsets), pa.py_buffer(chars), pa.py_buffer(validity)
    )


def _empty_counts() -> np.ndarray:
    """Rows per (p_true grid index, label): the exact sufficient statistic of Bayes metrics."""
    return np.zeros((PROBABILITY_GRID, 2), dtype=np.int64)


def _truth_path(out: Path, day: int) -> Path:
    return out / TRUTH_DIR / f"day={day}.parquet"


def _write_truth(out: Path, day: int, counts: np.ndarray) -> None:
    present = np.flatnonzero(counts.sum(axis=1))
    table = pa.table(
        {
            schema.TRUE_PROBABILITY: pa.array((present / PROBABILITY_GRID).astype(np.float32)),
            "negatives": pa.array(counts[present, 0]),
            "positives": pa.array(counts[present, 1]),
        }
    )
    path = _truth_path(out, day)
    path.parent.mkdir(exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    pq.write_table(table, partial)
    partial.replace(path)


def _read_truth(out: Path, day: int) -> np.ndarray:
    path = _truth_path(out, day)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise CtrscaleError(
            f"{path}: missing, so the 'all' Bayes metrics cannot be recomputed; regenerate "
            f"day {day} with --first-day {day} --days 1"
        ) from None
    counts = _empty_counts()
    grid = np.rint(table[schema.TRUE_PROBABILITY].to_numpy() * PROBABILITY_GRID).astype(np.int64)
    counts[grid, 0] = table["negatives"].to_numpy()
    counts[grid, 1] = table["positives"].to_numpy()
    return counts


def _split_metrics(counts: np.ndarray) -> dict[str, Any]:
    present = np.flatnonzero(counts.sum(axis=1))
    negatives, positives = counts[present, 0], counts[present, 1]
    p_true = present / PROBABILITY_GRID
    rows, clicks = int(counts.sum()), int(positives.sum())
    both_classes = 0 < clicks < rows
    return {
        "rows": rows,
        "positives": clicks,
        "ctr": clicks / rows,
        "mean_p_true": float(p_true @ (negatives + positives)) / rows,
        "bayes_auc": metrics.auc_from_counts(positives, negatives) if both_classes else None,
        "bayes_logloss": metrics.logloss_from_counts(p_true, positives, negatives),
    }


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
