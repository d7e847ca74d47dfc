"""Parquet data read from an object store (S3 through pyarrow.fs), against a local S3-compatible
server (moto) that the tests start themselves: the same batches and the same training result
as the local copy, and clear errors for what is not there."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from runner import metrics, run_ctrscale, tiny_overrides, train_args
from support import free_port

from ctrscale.data.loader import ParquetBatchLoader
from ctrscale.errors import DataError

BUCKET = "ctr-logs"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free port; its endpoint and credentials in the environment (which
    child processes inherit) for as long as the module's tests run."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto did not start"
            time.sleep(0.1)
    saved = {key: os.environ.get(key) for key in [*CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait()


@pytest.fixture(scope="module")
def s3_dataset(s3_endpoint, tiny_dataset) -> str:
    """The tiny synthetic dataset copied to s3://ctr-logs/tiny (metadata.json included)."""
    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, allow_bucket_creation=True, **_keys())
    s3.create_dir(BUCKET)
    pafs.copy_files(str(tiny_dataset), f"{BUCKET}/tiny", destination_filesystem=s3)
    return f"s3://{BUCKET}/tiny"


def _keys() -> dict[str, str]:
    return {
        "access_key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


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
