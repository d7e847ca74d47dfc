"""`ctrscale synth`: layout, determinism, realism and the Bayes-optimal numbers it records."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctrscale import cli, metrics
from ctrscale.data import schema, synth
from ctrscale.data.synth import days as synth_days
from ctrscale.data.synth.rows import CHUNK_ROWS
from ctrscale.data.synth.teacher import PROBABILITY_GRID
from ctrscale.errors import CtrscaleError

ROWS = 150_000  # two chunks, the second partial


@pytest.fixture(scope="module")
def two_days(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synth.generate(out, ROWS, days=2, seed=5)
    return out


def read_day(out: Path, day: int) -> dict[str, np.ndarray]:
    table = pq.read_table(out / f"day={day}")
    return {name: table[name].to_numpy() for name in table.column_names}


def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_layout_and_schema(two_days: Path) -> None:
    expected = schema.PARQUET_SCHEMA.append(
        synth_days.PARQUET_SCHEMA.field(schema.TRUE_PROBABILITY)
    )
    part = two_days / "day=0" / "part-00000.parquet"
    assert pq.read_schema(part).equals(expected)
    assert pq.read_schema(part).field("p_true").type == "float"
    row_groups = [pq.ParquetFile(part).metadata.row_group(i).num_rows for i in range(2)]
    assert row_groups == [CHUNK_ROWS, ROWS - CHUNK_ROWS]
    assert (two_days / "day=1" / "part-00000.parquet").exists()
    meta = schema.read_metadata(two_days)
    assert meta["version"] == 1 and meta["generator"] == "ctrscale.synth"
    assert meta["seed"] == 5 and meta["cardinality_scale"] == 0.01
    assert meta["dense_transform"] == "log1p" and meta["ids"] == "synthetic"
    assert set(meta["splits"]) == {"day=0", "day=1", "all"}
    assert meta["splits"]["all"]["rows"] == 2 * ROWS


def test_table_sizes_follow_scaled_criteo_cardinalities(two_days: Path) -> None:
    sizes = schema.read_metadata(two_days)["table_sizes"]
    assert sizes["C3"] == math.ceil(10_131_227 * 0.01) + 1  # + id 0 for "missing"
    assert sizes["C9"] == 3 + 1  # tiny fields keep up to 3 values
    assert sizes["C6"] == 3 + 1
    assert sizes["C20"] == 3 + 1


def test_ids_dense_and_missing_values(two_days: Path) -> None:
    sizes = schema.read_metadata(two_days)["table_sizes"]
    day = read_day(two_days, 0)
    for name in schema.SPARSE_FEATURES:
        assert day[name].min() >= 0 and day[name].max() < sizes[name], name
    # Missing ids (0) only in the fields Criteo has missing, and together within a group.
    assert (day["C1"] > 0).all()
    assert (day["C3"] == 0).mean() == pytest.approx(0.034, abs=0.005)
    assert (day["C22"] == 0).mean() == pytest.approx(0.76, abs=0.01)
    np.testing.assert_array_equal(day["C19"] == 0, day["C26"] == 0)
    for name in schema.DENSE_FEATURES:
        assert day[name].dtype == np.float32
        assert np.isfinite(day[name]).all() and day[name].min() >= 0, name
    assert (day["I12"] == 0).mean() > 0.7  # 77% missing, stored as 0 like prepare
    assert day["I5"].max() > math.log1p(100_000)  # heavy tail: I5 reaches large counts


def test_base_ctr_and_calibration(two_days: Path) -> None:
    day = read_day(two_days, 0)
    assert day["label"].mean() == pytest.approx(0.256, abs=0.006)
    assert day["p_true"].mean() == pytest.approx(0.256, abs=0.004)
    # Labels are drawn from p_true: within each decile of p_true the click rate matches it.
    order = np.argsort(day["p_true"])
    for bucket in np.array_split(order, 10):
        assert day["label"][bucket].mean() == pytest.approx(day["p_true"][bucket].mean(), abs=0.012)


def test_p_true_lies_on_its_grid(two_days: Path) -> None:
    grid = read_day(two_days, 1)["p_true"].astype(np.float64) * PROBABILITY_GRID
    np.testing.assert_array_equal(grid, np.rint(grid))
    assert grid.min() >= 1 and grid.max() <= PROBABILITY_GRID - 1


def test_frequencies_are_skewed_with_a_long_tail(two_days: Path) -> None:
    ids = read_day(two_days, 0)["C3"]
    ids, counts = np.unique(ids[ids > 0], return_counts=True)
    counts_high_to_low = np.sort(counts)[::-1]
    top_percent = counts_high_to_low[: counts.size // 100].sum() / counts.sum()
    assert top_percent > 0.5  # the top 1% of ids carry most rows
    assert (counts <= 2).mean() > 0.5  # most distinct ids are seen once or twice
    # Ids are permuted: the most frequent ids are not the smallest id numbers.
    assert np.median(ids[np.argsort(counts)[-20:]]) > 1_000


def test_stored_bayes_metrics_equal_recomputation_from_parquet(two_days: Path) -> None:
    splits = schema.read_metadata(two_days)["splits"]
    days = [read_day(two_days, day) for day in (0, 1)]
    for name, rows in [("day=0", [days[0]]), ("day=1", [days[1]]), ("all", days)]:
        p_true = np.concatenate([d["p_true"] for d in rows])
        labels = np.concatenate([d["label"] for d in rows])
        entry = splits[name]
        assert entry["rows"] == labels.size and entry["positives"] == labels.sum()
        assert entry["bayes_auc"] == pytest.approx(metrics.exact_auc(p_true, labels), abs=1e-12)
        assert entry["bayes_logloss"] == pytest.approx(metrics.logloss(p_true, labels), abs=1e-9)
    assert 0.76 < splits["all"]["bayes_auc"] < 0.86


def test_bayes_auc_beats_a_model_fitted_on_another_day(two_days: Path) -> None:
    """Per-feature target encoding (naive-Bayes log-odds) fitted on day 0, scored on day 1."""
    train, test = read_day(two_days, 0), read_day(two_days, 1)
    prior = train["label"].mean()
    score = np.zeros(test["label"].size)
    for name in schema.SPARSE_FEATURES:
        size = int(max(train[name].max(), test[name].max())) + 1
        clicks = np.bincount(train[name], weights=train["label"], minlength=size)
        shows = np.bincount(train[name], minlength=size)
        smoothed = (clicks + 20 * prior) / (shows + 20)  # shrink rare ids to the prior
        score += np.log(smoothed / (1 - smoothed))[test[name]]
    student = metrics.exact_auc(score, test["label"])
    bayes = metrics.exact_auc(test["p_true"], test["label"])
    assert 0.6 < student < bayes


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    synth.generate(tmp_path / "a", 140_000, seed=3)
    synth.generate(tmp_path / "b", 140_000, seed=3)
    synth.generate(tmp_path / "c", 140_000, seed=4)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert (tmp_path / "a/day=0/part-00000.parquet").read_bytes() != (
        tmp_path / "c/day=0/part-00000.parquet"
    ).read_bytes()


def test_a_longer_day_extends_a_shorter_one(tmp_path: Path, two_days: Path) -> None:
    synth.generate(tmp_path, 1_000, seed=5)
    short, long = read_day(tmp_path, 0), read_day(two_days, 0)
    for name, values in short.items():
        np.testing.assert_array_equal(values, long[name][:1_000], err_msg=name)


def test_added_days_come_from_the_same_teacher(tmp_path: Path, two_days: Path) -> None:
    synth.generate(tmp_path, ROWS, seed=5)
    day0_files = files_of(tmp_path / "day=0")
    meta = synth.generate(tmp_path, ROWS, seed=5, first_day=1)
    assert files_of(tmp_path / "day=0") == day0_files
    assert files_of(tmp_path / "day=1") == files_of(two_days / "day=1")
    # Merged metadata, "all" recomputed over both days: the same as one two-day run.
    assert meta == schema.read_metadata(tmp_path) == schema.read_metadata(two_days)


def test_adding_days_with_another_seed_is_refused(tmp_path: Path) -> None:
    synth.generate(tmp_path, 1_000, seed=1)
    with pytest.raises(CtrscaleError, match="'seed' differs"):
        synth.generate(tmp_path, 1_000, seed=2, first_day=1)


def test_regenerating_a_day_needs_overwrite_and_then_replaces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synth_days, "ROW_GROUPS_PER_FILE", 1)
    synth.generate(tmp_path, 140_000, seed=1, days=2)
    assert len(list((tmp_path / "day=1").iterdir())) == 2
    before = files_of(tmp_path / "day=1")
    with pytest.raises(CtrscaleError, match=r"day=1 \(140,000 rows\): pass --overwrite"):
        synth.generate(tmp_path, 1_000, seed=1, first_day=1)
    assert files_of(tmp_path / "day=1") == before  # untouched
    meta = synth.generate(tmp_path, 1_000, seed=1, first_day=1, overwrite=True)
    assert meta["splits"]["day=1"]["rows"] == 1_000
    assert meta["splits"]["all"]["rows"] == 141_000
    assert sorted(p.name for p in (tmp_path / "day=1").iterdir()) == ["part-00000.parquet"]


def test_tsv_is_raw_criteo_and_round_trips_to_the_parquet_rows(tmp_path: Path) -> None:
    rows = 2_000
    synth.generate(tmp_path / "tsv", rows, seed=9, fmt="tsv", first_day=3)
    synth.generate(tmp_path / "pq", rows, seed=9, first_day=3)
    parquet = read_day(tmp_path / "pq", 3)
    meta = schema.read_metadata(tmp_path / "tsv")
    assert meta["splits"]["day=3"] == schema.read_metadata(tmp_path / "pq")["splits"]["day=3"]
    lines = (tmp_path / "tsv" / "day_3.tsv").read_text().split("\n")
    assert lines[-1] == "" and len(lines) == rows + 1
    empty_fields = 0
    for row, line in enumerate(lines[:-1]):
        fields = line.split("\t")
        assert len(fields) == 40
        assert int(fields[0]) == parquet["label"][row]
        for name, field in zip(schema.DENSE_FEATURES, fields[1:14], strict=True):
            count = 0 if field == "" else int(field)
            assert np.float32(math.log1p(max(count, 0))) == parquet[name][row]
        for name, field in zip(schema.SPARSE_FEATURES, fields[14:], strict=True):
            empty_fields += field == ""
            if field == "":
                assert parquet[name][row] == 0
            else:
                assert len(field) == 8 and field == field.lower()
                assert synth_days.decode_hex_id(name, field) == parquet[name][row]
    assert empty_fields > 0
    i2 = [int(line.split("\t")[2]) for line in lines[:-1]]
    assert min(i2) == -1  # I2 is the count that can be negative, as in Criteo


def test_hex_scramble_keeps_distinct_ids_distinct() -> None:
    ids = np.arange(1, 200_001, dtype=np.int64)
    hex_values = synth_days._hex_column("C3", ids).to_pylist()
    assert len(set(hex_values)) == ids.size
    assert [synth_days.decode_hex_id("C3", value) for value in hex_values[:100]] == list(
        range(1, 101)
    )


def test_cli_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["synth", "--rows", "3000", "--days", "2", "--out", str(tmp_path), "--seed", "1"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "day=0" in printed and "day=1" in printed and "Bayes AUC" in printed
    assert "rows/s" in printed
    assert json.loads((tmp_path / "metadata.json").read_text())["splits"]["all"]["rows"] == 6000


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rows", "0"], "--rows must be at least 1"),
        (["--rows", "10", "--cardinality-scale", "2"], "--cardinality-scale"),
        (["--rows", "10", "--seed", "-1"], "--seed"),
    ],
)
def test_cli_rejects_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert cli.main(["synth", "--out", str(tmp_path), *flags]) == 2  # bad input
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_memory_does_not_grow_with_rows(tmp_path: Path) -> None:
    """Peak RSS of 3M rows stays close to that of 300K rows: chunks stream to disk."""

    def peak_rss_mb(rows: int) -> float:
        code = (
            "import resource, sys; from ctrscale.data import synth; "
            f"synth.generate(sys.argv[1], {rows}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
        )
        run = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / str(rows))],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(run.stdout)

    # A whole 3M-row day held in memory would take ≥ 3M × 300 B ≈ 900 MB more.
    assert peak_rss_mb(3_000_000) - peak_rss_mb(300_000) < 200
