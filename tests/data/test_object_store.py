"""Parquet data in an object store (S3 through pyarrow.fs), against a local S3-compatible server
(moto) that the tests start themselves: read with the same batches and the same training result
as the local copy, clear errors for what is not there, and `prepare --out s3://…` publishing
days through metadata.json."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from runner import metrics, run_ctrscale, tiny_overrides, train_args
from support import s3_filesystem

from ctrscale.data.loader import ParquetBatchLoader
from ctrscale.errors import DataError
from ctrscale.storage import ObjectStore

BUCKET = "ctr-logs"


@pytest.fixture(scope="module")
def s3_dataset(s3_endpoint, tiny_dataset) -> str:
    """The tiny synthetic dataset copied to s3://ctr-logs/tiny (metadata.json included)."""
    s3 = s3_filesystem(s3_endpoint)
    s3.create_dir(BUCKET)
    pafs.copy_files(str(tiny_dataset), f"{BUCKET}/tiny", destination_filesystem=s3)
    return f"s3://{BUCKET}/tiny"


def rows(loader: ParquetBatchLoader) -> list[list[float]]:
    return [batch.dense_features[:, 0].tolist() for batch in loader]


def test_a_uri_reads_the_same_batches_as_the_local_copy(s3_dataset, tiny_dataset):
    kwargs = dict(shuffle=True, seed=4, split="train", holdout_fraction=0.1, drop_last=False)
    remote = ParquetBatchLoader([s3_dataset], 4096, **kwargs)
    local = ParquetBatchLoader([str(tiny_dataset)], 4096, **kwargs)
    assert remote.table_sizes == local.table_sizes and remote.num_rows == local.num_rows
    assert all(name.startswith(f"{s3_dataset}/day=0/") for name in remote.files)
    assert rows(remote) == rows(local)
    # A day prefix and a single object work too.
    day = ParquetBatchLoader([f"{s3_dataset}/day=0"], 4096)
    assert day.files == remote.files
    one = remote.files[0]
    assert ParquetBatchLoader([one], 1024).files == [one]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (f"s3://{BUCKET}/absent", "no such object or prefix"),
        (f"s3://{BUCKET}/tiny/day=*", "globs are not supported in URIs"),
    ],
)
def test_what_a_uri_does_not_hold_is_a_clear_error_naming_it(s3_dataset, uri, expected):
    with pytest.raises(DataError, match=expected) as raised:
        ParquetBatchLoader([uri], 1024)
    assert uri in str(raised.value)


def test_training_from_the_object_store_matches_training_from_disk(
    s3_dataset, tiny_dataset, tmp_path
):
    settings = {"train.max_steps": 3}
    run_ctrscale(train_args(tmp_path / "local", tiny_overrides(tiny_dataset, **settings)))
    remote = [*tiny_overrides(tiny_dataset, **settings), f'data.train=["{s3_dataset}"]']
    run_ctrscale(train_args(tmp_path / "remote", remote))
    local, from_s3 = metrics(tmp_path / "local"), metrics(tmp_path / "remote")
    for key in ("auc", "logloss", "steps", "bayes_auc"):
        assert from_s3[key] == local[key], key


@pytest.fixture(scope="module")
def raw_days(tmp_path_factory) -> list[Path]:
    """Two small raw Criteo days, day_0.tsv and day_1.tsv."""
    from ctrscale.data.synth import generate

    directory = tmp_path_factory.mktemp("raw")
    generate(directory, rows_per_day=3000, days=2, seed=5, cardinality_scale=0.0003, fmt="tsv")
    return sorted(directory.glob("day_*.tsv"))


def prepare(inputs: list[Path], out: str, *extra: str):
    return run_ctrscale(["prepare", *map(str, inputs), "--out", out, "--ids", "vocab", *extra])


def all_rows(path: str) -> list[float]:
    loader = ParquetBatchLoader([path], 512, shuffle=False, drop_last=False)
    return sorted(value for batch in rows(loader) for value in batch)


def test_prepare_onto_an_object_store_publishes_days_only_through_metadata(
    s3_endpoint, raw_days, tmp_path
):
    s3 = s3_filesystem(s3_endpoint)
    s3.create_dir("prepared")
    uri = "s3://prepared/criteo"
    prepare(raw_days[:1], uri)
    prepare(raw_days[1:], uri)  # a later day: the stored vocabulary keeps ids stable
    prepare(raw_days, str(tmp_path / "local"))
    assert all_rows(uri) == all_rows(str(tmp_path / "local"))
    listing = s3.get_file_info(pafs.FileSelector("prepared/criteo", recursive=True))
    days = {
        f.path.split("/")[-2] for f in listing if f.path.endswith(".parquet") and "day=" in f.path
    }
    assert days == {"day=0", "day=1"}

    # Objects of a day whose upload has not finished (not in metadata.json yet) are not read.
    s3.copy_file(
        "prepared/criteo/day=0/part-00000.parquet", "prepared/criteo/day=7/part-00000.parquet"
    )
    assert (
        ParquetBatchLoader([uri], 512).num_rows
        == ParquetBatchLoader([str(tmp_path / "local")], 512).num_rows
    )

    refused = run_ctrscale(
        ["prepare", str(raw_days[0]), "--out", uri, "--ids", "vocab"], check=False
    )
    assert refused.returncode == 2 and f"{uri}: day=0 already exist" in refused.stderr
    prepare(raw_days[:1], uri, "--overwrite")
    assert all_rows(uri) == all_rows(str(tmp_path / "local"))
    # A replacement whose conversion fails leaves the day listed and readable as it was.
    garbled = tmp_path / "day_0.tsv"
    garbled.write_text("not\ta criteo row\n" * 50)
    failed = run_ctrscale(
        ["prepare", str(garbled), "--out", uri, "--ids", "vocab", "--overwrite"], check=False
    )
    assert failed.returncode != 0
    assert all_rows(uri) == all_rows(str(tmp_path / "local"))


def test_a_run_resumes_from_its_object_store_checkpoints_on_a_machine_without_them(
    s3_endpoint, tiny_dataset, tmp_path
):
    s3 = s3_filesystem(s3_endpoint)
    s3.create_dir("checkpoints")
    every = {"train.checkpoint_every_steps": 2, "train.eval_every_steps": 3}
    straight = tmp_path / "straight"
    run_ctrscale(
        train_args(straight, tiny_overrides(tiny_dataset, **every, **{"train.max_steps": 6}))
    )

    mirrored = {**every, "train.checkpoint_uri": "s3://checkpoints/run"}
    first = tmp_path / "first-machine"
    run_ctrscale(
        train_args(first, tiny_overrides(tiny_dataset, **mirrored, **{"train.max_steps": 4}))
    )
    names = sorted(
        info.base_name for info in s3.get_file_info(pafs.FileSelector("checkpoints/run"))
    )
    assert names == ["latest", "step-00000002", "step-00000004"]
    # A new machine: an empty run directory. Starting afresh would overwrite the store's run.
    second = tmp_path / "second-machine"
    longer = tiny_overrides(tiny_dataset, **mirrored, **{"train.max_steps": 6})
    refused = run_ctrscale(train_args(second, longer), check=False)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    assert "s3://checkpoints/run already holds a run's checkpoints" in refused.stderr
    run_ctrscale([*train_args(second, longer), "--resume"])
    for key in ("auc", "logloss", "steps"):
        assert metrics(second)[key] == metrics(straight)[key], key
    latest = s3.open_input_stream("checkpoints/run/latest").read().decode().strip()
    assert latest == "step-00000006"
    kept = sorted(info.base_name for info in s3.get_file_info(pafs.FileSelector("checkpoints/run")))
    assert kept == ["latest", "step-00000004", "step-00000006"]  # the two newest, as on disk
    # The store's checkpoint scores as the run did, and warm-starts another run.
    scored = run_ctrscale(["evaluate", "--checkpoint", "s3://checkpoints/run",
                           *(f"--set={o}" for o in longer)])  # fmt: skip
    assert json.loads(scored.stdout.strip().splitlines()[-1])["auc"] == metrics(second)["auc"]
    warm = tiny_overrides(tiny_dataset, **{"train.max_steps": 1,
                                           "train.warm_start": "s3://checkpoints/run"})  # fmt: skip
    run_ctrscale(train_args(tmp_path / "warm", warm))
    cold = tiny_overrides(tiny_dataset, **{"train.max_steps": 1})
    run_ctrscale(train_args(tmp_path / "cold", cold))
    # One step from the trained model scores nearer to it than one step from scratch.
    gap = {
        run: abs(metrics(tmp_path / run)["auc"] - metrics(second)["auc"])
        for run in ("warm", "cold")
    }
    assert gap["warm"] < gap["cold"]
    assert not (tmp_path / "warm" / "warm-start").exists()  # the downloaded copy, once loaded


def test_a_file_uri_is_a_store_like_any_other(raw_days, tmp_path):
    # prepare onto it, read from it: the same rows as the local path, the days through its
    # metadata.json; its pointer-like objects are replaced whole.
    uri = f"file://{tmp_path / 'mounted-bucket'}"
    prepare(raw_days, uri)
    prepare(raw_days, str(tmp_path / "local"))
    assert all_rows(uri) == all_rows(str(tmp_path / "local"))
    store = ObjectStore(uri, "test")
    store.write_bytes(b"step-00000002\n", "runs", "latest")
    store.write_bytes(b"step-00000004\n", "runs", "latest")
    assert (tmp_path / "mounted-bucket" / "runs" / "latest").read_bytes() == b"step-00000004\n"
    assert sorted(p.name for p in (tmp_path / "mounted-bucket" / "runs").iterdir()) == ["latest"]
