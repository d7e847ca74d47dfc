"""`ctrscale prepare`: every cell of real rows, each reject kind, atomic publishing, reuse of
the stored encoding across days. Expected values are computed here with plain Python."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctrscale.cli import main
from ctrscale.data import prepare, schema
from ctrscale.data.prepare import parse, prepare_files, writer
from ctrscale.errors import CtrscaleError, DataError

DEFAULT_SIZES = {
    name: min(max(card, min(100 * card, 100_000)), 10_000_000) + 1
    for name, card in schema.CRITEO_KAGGLE_CARDINALITIES.items()
}


# --- helpers: raw rows and an independent reference implementation ---------------------------


def random_line(rng: random.Random, hex_pool: list[str] | None = None) -> str:
    """A valid raw Criteo line with some missing fields."""
    fields = [str(rng.randint(0, 1))]
    for _ in range(13):
        fields.append("" if rng.random() < 0.2 else str(rng.randint(-3, 5000)))
    for _ in range(26):
        if rng.random() < 0.1:
            fields.append("")
        elif hex_pool:
            fields.append(rng.choice(hex_pool))
        else:
            fields.append(f"{rng.getrandbits(32):08x}")
    return "\t".join(fields)


def write_lines(path: Path, lines: list[str], final_newline: bool = True) -> Path:
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""))
    return path


def raw_fields(line: str) -> list[str]:
    fields = line.split("\t")
    return fields + [""] * (40 - len(fields))


def expected_log1p_hash(line: str, sizes: dict[str, int] = DEFAULT_SIZES) -> list[float | int]:
    fields = raw_fields(line)
    row: list[float | int] = [int(fields[0])]
    for raw in fields[1:14]:
        row.append(np.float32(math.log1p(max(int(raw), 0))) if raw else 0.0)
    for name, raw in zip(schema.SPARSE_FEATURES, fields[14:], strict=True):
        row.append(1 + int(raw, 16) % (sizes[name] - 1) if raw else 0)
    return row


def read_day(out: Path, day: int) -> list[list[float | int]]:
    files = sorted((out / f"day={day}").glob("part-*.parquet"))
    rows: list[list[float | int]] = []
    for path in files:
        table = pq.read_table(path)
        columns = [table.column(name).to_pylist() for name in schema.RAW_COLUMNS]
        rows += [list(row) for row in zip(*columns, strict=True)]
    return rows


def assert_rows_equal(actual: list[list[float | int]], expected: list[list[float | int]]) -> None:
    assert len(actual) == len(expected)
    got, want = np.array(actual, dtype=np.float64), np.array(expected, dtype=np.float64)
    np.testing.assert_array_equal(got[:, 0], want[:, 0])
    np.testing.assert_allclose(got[:, 1:14], want[:, 1:14], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(got[:, 14:], want[:, 14:])


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != prepare.SUMMARY_FILE
    }


@pytest.fixture
def good_lines() -> list[str]:
    rng = random.Random(7)
    return [random_line(rng) for _ in range(60)]


# --- the real sample ---------------------------------------------------------------------------


def test_real_sample_every_cell_matches_plain_python(criteo_sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    summary = prepare_files([criteo_sample], out)

    lines = criteo_sample.read_text().splitlines()
    assert_rows_equal(read_day(out, 0), [expected_log1p_hash(line) for line in lines])
    assert summary["rows_in"] == summary["rows_out"] == 100 and summary["rejected"] == 0

    part = out / "day=0" / "part-00000.parquet"
    assert pq.read_schema(part).remove_metadata().equals(schema.PARQUET_SCHEMA)
    manifest = json.loads((out / "day=0" / prepare.MANIFEST_FILE).read_text())
    assert manifest["rows"] == 100
    assert manifest["files"] == [
        {
            "path": "part-00000.parquet",
            "rows": 100,
            "sha256": hashlib.sha256(part.read_bytes()).hexdigest(),
        }
    ]
    meta = schema.read_metadata(out)
    positives = sum(line.split("\t")[0] == "1" for line in lines)
    assert meta["days"] == {
        "0": {"rows": 100, "positives": positives, "source": str(criteo_sample)}
    }
    assert meta["table_sizes"] == DEFAULT_SIZES
    assert (meta["dense_transform"], meta["ids"]) == ("log1p", "hash")
    assert json.loads((out / prepare.SUMMARY_FILE).read_text())["status"] == "ok"


def test_cli_prepares_the_sample_and_reports_bad_data(
    criteo_sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ds"
    assert main(["prepare", str(criteo_sample), "--out", str(out), "--day", "3"]) == 0
    assert "100 rows in, 100 out, 0 rejected" in capsys.readouterr().out
    assert (out / "day=3" / "part-00000.parquet").exists()

    bad = write_lines(tmp_path / "bad.tsv", ["2\t1" + "\t" * 38])
    assert main(["prepare", str(bad), "--out", str(out), "--day", "4"]) == 2  # bad input
    err = capsys.readouterr().err
    assert "bad.tsv: 1 of 1 rows rejected" in err and "first bad line 1: bad_label" in err


# --- parsing and rejects -----------------------------------------------------------------------


def test_each_bad_row_kind_is_rejected_counted_and_logged(
    good_lines: list[str], tmp_path: Path
) -> None:
    good = good_lines[0].split("\t")

    def with_field(index: int, value: str) -> str:
        return "\t".join([*good[:index], value, *good[index + 1 :]])

    bad = {
        "too_many_fields": ("\t".join([*good, "00000000"]), None),
        "too_few_fields": ("\t".join(good[:20]), None),  # a line cut to 20 fields
        "empty_line": ("", None),
        "bad_label": (with_field(0, "2"), "label"),
        "bad_integer": (with_field(3, "1.5"), "I3"),
        "bad_categorical": (with_field(20, "12345"), "C7"),
    }
    more_bad = [
        with_field(0, ""),  # missing label
        with_field(1, "x7"),
        with_field(14, "zzzzzzzz"),
        with_field(15, "+1234567"),
        with_field(16, "-0000000"),
        with_field(17, "123456789"),
        with_field(18, "ab cdef0"),
        with_field(19, "é1234567"),  # non-ASCII: shown as '?' per byte
        with_field(5, "\x01"),  # the byte polars' line framing uses as separator
        "\t".join([*good, ""]),  # 41 fields, the extra one empty
        "1\t5\t00000000",  # 3 fields
        "0",  # the label alone
    ]
    lines = list(good_lines)
    bad_line_numbers = {}
    for reason, (line, _) in bad.items():
        bad_line_numbers[reason] = len(lines) + 1
        lines.append(line)
        lines.append(good_lines[len(lines) % len(good_lines)])
    lines += more_bad
    source = write_lines(tmp_path / "mixed.tsv", lines)
    out = tmp_path / "ds"

    summary = prepare_files([source], out, max_reject_fraction=1.0)

    assert summary["rejected_by_reason"] == {
        "empty_line": 1,
        "too_many_fields": 2,
        "too_few_fields": 3,
        "bad_label": 2,
        "bad_integer": 3,
        "bad_categorical": 7,
    }
    assert summary["rows_in"] == len(lines) and summary["rows_out"] == len(lines) - 18
    valid = [
        line for line in lines if line not in more_bad and line not in {b for b, _ in bad.values()}
    ]
    assert_rows_equal(read_day(out, 0), [expected_log1p_hash(line) for line in valid])

    logged = (out / "rejects" / "day=0.tsv").read_text().splitlines()
    assert logged[0] == "file\tline\treason\tcolumn\tvalue"
    records = [row.split("\t") for row in logged[1:]]
    assert len(records) == 18
    for reason, (_, column) in bad.items():
        record = next(r for r in records if r[1] == str(bad_line_numbers[reason]))
        assert record[0] == str(source) and record[2] == reason
        assert record[3] == (column or "")
    assert ["bad_categorical", "C2", "+1234567"] in [r[2:] for r in records]
    assert ["too_many_fields", "", "41 fields"] in [r[2:] for r in records]
    assert ["too_few_fields", "", "3 fields"] in [r[2:] for r in records]
    assert ["too_few_fields", "", "1 fields"] in [r[2:] for r in records]
    assert ["bad_categorical", "C6", "??1234567"] in [r[2:] for r in records]
    assert ["bad_integer", "I5", "?"] in [r[2:] for r in records]


def test_stripped_trailing_tabs_are_accepted_when_asked_crlf_and_no_final_newline_parse(
    good_lines: list[str], tmp_path: Path
) -> None:
    sparse_tail = [line.split("\t")[:30] + [""] * 10 for line in good_lines[:20]]
    kept = ["\t".join(fields) for fields in sparse_tail]
    stripped = ["\t".join(fields).rstrip("\t") for fields in sparse_tail]
    stripped[3] = "1"  # only a label: every other field missing
    kept[3] = "1" + "\t" * 39
    assert any(len(line.split("\t")) < 40 for line in stripped)

    prepare_files([write_lines(tmp_path / "kept.tsv", kept)], tmp_path / "a")
    stripped_file = write_lines(tmp_path / "stripped.tsv", stripped, final_newline=False)
    with pytest.raises(DataError, match="too_few_fields"):  # by default: cut lines
        prepare_files([stripped_file], tmp_path / "strict")
    prepare_files([stripped_file], tmp_path / "b", short_lines=True)
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes("\r\n".join(stripped).encode() + b"\r\n")
    prepare_files([crlf], tmp_path / "c", short_lines=True)

    expected = [expected_log1p_hash(line) for line in kept]
    assert_rows_equal(read_day(tmp_path / "a", 0), expected)
    assert_rows_equal(read_day(tmp_path / "b", 0), expected)
    assert_rows_equal(read_day(tmp_path / "c", 0), expected)


def test_gzip_input_equals_plain_input(good_lines: list[str], tmp_path: Path) -> None:
    plain = write_lines(tmp_path / "day_2", good_lines)
    packed = tmp_path / "day_2.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))

    prepare_files([plain], tmp_path / "plain")
    prepare_files([packed], tmp_path / "packed")

    assert read_day(tmp_path / "plain", 2) == read_day(tmp_path / "packed", 2)
    assert len(read_day(tmp_path / "packed", 2)) == len(good_lines)


def test_chunk_boundaries_keep_rows_and_line_numbers(
    good_lines: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [*good_lines[:2], "x", *good_lines[2:44], "y", *good_lines[44:]]
    source = write_lines(tmp_path / "in.tsv", lines)
    monkeypatch.setattr(parse, "CHUNK_BYTES", 1000)  # a few lines per chunk, lines cut in two

    prepare_files([source], tmp_path / "ds", max_reject_fraction=0.1)

    assert_rows_equal(read_day(tmp_path / "ds", 0), [expected_log1p_hash(x) for x in good_lines])
    logged = (tmp_path / "ds" / "rejects" / "day=0.tsv").read_text().splitlines()
    rejected = [row.split("\t")[1:3] for row in logged[1:]]
    assert rejected == [["3", "too_few_fields"], ["46", "too_few_fields"]]


def test_row_groups_and_files_have_the_requested_sizes(
    good_lines: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "ROW_GROUPS_PER_FILE", 3)
    monkeypatch.setattr(parse, "CHUNK_BYTES", 2000)
    source = write_lines(tmp_path / "in.tsv", good_lines)

    prepare_files([source], tmp_path / "ds", row_group_rows=7)

    day = tmp_path / "ds" / "day=0"
    groups = [
        [
            pq.ParquetFile(path).metadata.row_group(i).num_rows
            for i in range(pq.ParquetFile(path).num_row_groups)
        ]
        for path in sorted(day.glob("part-*.parquet"))
    ]
    assert groups == [[7, 7, 7], [7, 7, 7], [7, 7, 4]]
    manifest = json.loads((day / prepare.MANIFEST_FILE).read_text())
    assert [f["rows"] for f in manifest["files"]] == [21, 21, 18] and manifest["rows"] == 60
    assert_rows_equal(read_day(tmp_path / "ds", 0), [expected_log1p_hash(x) for x in good_lines])


def test_overlong_line_and_empty_input_fail_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parse, "MAX_LINE_BYTES", 100)
    monkeypatch.setattr(parse, "CHUNK_BYTES", 64)
    with pytest.raises(DataError, match="longer than 100 bytes"):
        prepare_files([write_lines(tmp_path / "long.tsv", ["1" * 300])], tmp_path / "a")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(DataError, match="no rows"):
        prepare_files([empty], tmp_path / "b")
    assert not list((tmp_path / "b").glob("day=*"))


# --- failing runs publish nothing ----------------------------------------------------------


def test_reject_threshold_fails_and_leaves_the_dataset_byte_identical(
    good_lines: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "ds"
    prepare_files([write_lines(tmp_path / "day_0", good_lines)], out)
    before = snapshot(out)

    lines = list(good_lines)
    lines[4] = lines[4].replace("\t", "\tnope\t", 1)  # 41 fields and a bad I1
    lines[9] = "7" + lines[9][1:]
    bad_input = write_lines(tmp_path / "day_1", lines)
    with pytest.raises(DataError) as failure:
        prepare_files([bad_input], out, max_reject_fraction=0.02)
    message = str(failure.value)
    assert str(bad_input) in message and "2 of 60 rows rejected" in message
    assert "3.3333%" in message and "first bad line 5: too_many_fields" in message
    assert not (out / "day=1").exists()
    assert not list(out.glob(".tmp-*"))
    assert snapshot(out) == {**before, "rejects/day=1.tsv": snapshot(out)["rejects/day=1.tsv"]}
    summary = json.loads((out / prepare.SUMMARY_FILE).read_text())
    assert summary["status"] == "failed" and "2 of 60" in summary["error"]
    assert summary["rejected_by_reason"]["too_many_fields"] == 1
    assert summary["rejected_by_reason"]["bad_label"] == 1

    # the same data replacing a good day: the good day survives
    with pytest.raises(DataError):
        prepare_files([bad_input], out, days=[0], max_reject_fraction=0.02, overwrite=True)
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("rejects")} == {
        k: v for k, v in before.items() if not k.startswith("rejects")
    }

    # under the threshold the same file is published, its two bad lines dropped
    prepare_files([bad_input], out, max_reject_fraction=0.05)
    assert len(read_day(out, 1)) == 58


def test_crash_before_publish_leaves_no_partition(
    good_lines: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*_args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(writer, "publish_dir", crash)
    with pytest.raises(OSError, match="disk gone"):
        prepare_files([write_lines(tmp_path / "in.tsv", good_lines)], tmp_path / "ds")
    assert [p.name for p in (tmp_path / "ds").iterdir() if not p.name.startswith(".prepare")] == [
        prepare.SUMMARY_FILE
    ]


def test_leftover_temp_dir_is_not_a_partition(good_lines: list[str], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    prepare_files([write_lines(tmp_path / "day_0", good_lines)], out)
    leftover = out / ".tmp-day=1-deadbeef"
    leftover.mkdir()
    (leftover / "part-00000.parquet").write_bytes(b"half a file")

    prepare_files([write_lines(tmp_path / "day_1", good_lines[:10])], out)

    assert not leftover.exists()
    assert sorted(p.name for p in out.glob("day=*")) == ["day=0", "day=1"]
    assert len(read_day(out, 1)) == 10
    assert schema.read_metadata(out)["days"]["1"]["rows"] == 10


def test_existing_day_needs_overwrite_which_replaces_it(
    good_lines: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "ds"
    prepare_files([write_lines(tmp_path / "a.tsv", good_lines)], out, days=[5])
    with pytest.raises(CtrscaleError, match=r"day=5 already exist.*--overwrite"):
        prepare_files([write_lines(tmp_path / "b.tsv", good_lines[:7])], out, days=[5])
    assert len(read_day(out, 5)) == len(good_lines)

    prepare_files([tmp_path / "b.tsv"], out, days=[5], overwrite=True)

    assert_rows_equal(read_day(out, 5), [expected_log1p_hash(x) for x in good_lines[:7]])
    assert schema.read_metadata(out)["days"]["5"]["rows"] == 7
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.is_dir()) == []


# --- stored encodings are reused -------------------------------------------------------------


def test_day_numbers_from_flags_names_or_order(good_lines: list[str], tmp_path: Path) -> None:
    a, b = (
        write_lines(tmp_path / "x.tsv", good_lines[:5]),
        write_lines(tmp_path / "y", good_lines[5:9]),
    )
    prepare_files([a, b], tmp_path / "order")
    assert schema.read_metadata(tmp_path / "order")["days"].keys() == {"0", "1"}

    named = [
        write_lines(tmp_path / "day_12.tsv", good_lines[:3]),
        write_lines(tmp_path / "day_3", good_lines[:4]),
    ]
    prepare_files(named, tmp_path / "named")
    assert len(read_day(tmp_path / "named", 12)) == 3 and len(read_day(tmp_path / "named", 3)) == 4

    prepare_files([a, b], tmp_path / "flags", days=[9, 4])
    assert len(read_day(tmp_path / "flags", 4)) == 4
    with pytest.raises(CtrscaleError, match="same day"):
        prepare_files([a, b], tmp_path / "dup", days=[1, 1])
    with pytest.raises(CtrscaleError, match="1 --day values for 2 inputs"):
        prepare_files([a, b], tmp_path / "dup", days=[1])


def test_conflicting_flags_on_an_existing_dataset_are_refused(
    good_lines: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "ds"
    prepare_files([write_lines(tmp_path / "day_0", good_lines)], out, table_size=1000)
    day_1 = write_lines(tmp_path / "day_1", good_lines)
    for flags in (
        {"dense_transform": "minmax"},
        {"ids": "vocab"},
        {"table_size": 999},
        {"min_count": 2},
    ):
        with pytest.raises(CtrscaleError, match="contradicts the existing dataset"):
            prepare_files([day_1], out, **flags)
    prepare_files([day_1], out, dense_transform="log1p", ids="hash", table_size=1000)
    sizes = dict.fromkeys(schema.SPARSE_FEATURES, 1000)
    assert_rows_equal(read_day(out, 1), [expected_log1p_hash(x, sizes) for x in good_lines])
    with pytest.raises(CtrscaleError, match="--min-count applies to --ids vocab"):
        prepare_files([day_1], tmp_path / "new", min_count=3)


def test_vocab_ids_are_built_once_and_stable_across_days(tmp_path: Path) -> None:
    rng = random.Random(3)
    pool = ["0000000a", "0000000b", "0000000c", "000000ff", "deadbeef"]
    day_0 = [random_line(rng, pool) for _ in range(80)]
    out = tmp_path / "ds"
    prepare_files([write_lines(tmp_path / "day_0", day_0)], out, ids="vocab", min_count=12)

    # reference vocabulary: counts over day 0 only, kept when >= 12, ordered count desc, value asc
    fields = [raw_fields(line) for line in day_0]
    vocab = {}
    for k, name in enumerate(schema.SPARSE_FEATURES):
        counts: dict[int, int] = {}
        for row in fields:
            if row[14 + k]:
                counts[int(row[14 + k], 16)] = counts.get(int(row[14 + k], 16), 0) + 1
        kept = sorted((v for v, c in counts.items() if c >= 12), key=lambda v: (-counts[v], v))
        vocab[name] = {value: index + 2 for index, value in enumerate(kept)}
    assert any(len(v) < len(pool) for v in vocab.values())  # some values are OOV

    def expected(line: str) -> list[float | int]:
        row = expected_log1p_hash(line)
        raw = raw_fields(line)[14:]
        for k, name in enumerate(schema.SPARSE_FEATURES):
            row[14 + k] = vocab[name].get(int(raw[k], 16), 1) if raw[k] else 0
        return row

    assert_rows_equal(read_day(out, 0), [expected(line) for line in day_0])
    meta = schema.read_metadata(out)
    assert meta["table_sizes"] == {name: len(vocab[name]) + 2 for name in schema.SPARSE_FEATURES}
    assert (meta["ids"], meta["min_count"]) == ("vocab", 12)
    c1 = pq.read_table(out / "_vocab" / "C1.parquet").to_pylist()
    assert [(int(r["value"], 16), r["id"]) for r in c1] == sorted(
        vocab["C1"].items(), key=lambda kv: kv[1]
    )

    # day 1: new values are OOV, known values keep their ids, nothing is refitted
    day_1 = [random_line(rng, [*pool, "12345678"]) for _ in range(30)]
    prepare_files([write_lines(tmp_path / "day_1", day_1)], out)
    assert_rows_equal(read_day(out, 1), [expected(line) for line in day_1])
    assert schema.read_metadata(out)["table_sizes"] == meta["table_sizes"]


def test_minmax_is_fitted_once_and_reused(good_lines: list[str], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    prepare_files([write_lines(tmp_path / "day_0", good_lines)], out, dense_transform="minmax")

    filled = [[int(v) if v else 0 for v in raw_fields(line)[1:14]] for line in good_lines]
    bounds = [[min(col), max(col)] for col in zip(*filled, strict=True)]
    meta = schema.read_metadata(out)
    assert meta["dense_minmax"] == dict(zip(schema.DENSE_FEATURES, bounds, strict=True))

    def expected(line: str) -> list[float | int]:
        row = expected_log1p_hash(line)
        for k, raw in enumerate(raw_fields(line)[1:14]):
            low, high = bounds[k]
            value = ((int(raw) if raw else 0) - low) / (high - low)
            row[1 + k] = min(max(value, 0.0), 1.0)
        return row

    assert_rows_equal(read_day(out, 0), [expected(line) for line in good_lines])

    above = [["1", "99999", *raw_fields(line)[2:]] for line in good_lines[:5]]
    later = ["\t".join(fields) for fields in above] + ["0\t-50" + "\t" * 38]  # above max, below min
    prepare_files([write_lines(tmp_path / "day_1", later)], out)
    rows = read_day(out, 1)
    assert [row[1] for row in rows] == [1.0] * 5 + [0.0]
    assert_rows_equal(rows, [expected(line) for line in later])
    assert schema.read_metadata(out)["dense_minmax"] == meta["dense_minmax"]


def test_default_hash_ids_keep_collisions_of_real_values_at_most_one_percent(
    criteo_sample: Path, tmp_path: Path
) -> None:
    """Of the distinct categorical values in the 100 real Criteo rows, at most 1% share an id
    with another value of their field (3.3% when small fields had as many buckets as values);
    small fields get 100× headroom, so the tables grow by 2.5% in all."""
    prepare_files([criteo_sample], tmp_path / "ds")
    rows = read_day(tmp_path / "ds", 0)
    raw = [line.split("\t") for line in criteo_sample.read_text().splitlines()]
    distinct = colliding = 0
    for index in range(1 + 13, 1 + 13 + 26):  # the C-fields of a raw line
        ids_of: dict[str, int] = {}
        for fields, row in zip(raw, rows, strict=True):
            if fields[index]:
                ids_of[fields[index]] = row[index]
        per_id = collections.Counter(ids_of.values())
        distinct += len(ids_of)
        colliding += sum(per_id[i] > 1 for i in ids_of.values())
    assert distinct > 1000
    assert colliding / distinct <= 0.01
    current = sum(DEFAULT_SIZES.values())
    at_cardinality = sum(
        min(c, 10_000_000) + 1 for c in schema.CRITEO_KAGGLE_CARDINALITIES.values()
    )
    assert current / at_cardinality < 1.03


def test_sources_are_recorded_absolute_and_an_unusable_out_is_one_line(
    criteo_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(criteo_sample.parent)
    out = tmp_path / "ds"
    assert main(["prepare", criteo_sample.name, "--out", str(out), "--day", "0"]) == 0
    metadata = json.loads((out / schema.METADATA_FILE).read_text())
    assert metadata["days"]["0"]["source"] == str(criteo_sample.resolve())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    capsys.readouterr()
    assert main(["prepare", criteo_sample.name, "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker}: a file, not a directory" in err and "Traceback" not in err


def test_long_inputs_report_progress(
    good_lines: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parse, "CHUNK_BYTES", 2000)  # several chunks
    monkeypatch.setattr(parse, "PROGRESS_SECONDS", 0.0)  # a line after every chunk
    messages: list[str] = []
    source = write_lines(tmp_path / "day_0", good_lines)
    prepare_files([source], tmp_path / "ds", progress=messages.append)
    read = [m for m in messages if "lines of day_0 read" in m]
    assert len(read) >= 3
    assert read[-1] == f"day 0: {len(good_lines):,} lines of day_0 read, 0 rejected"
