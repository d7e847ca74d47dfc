"""The refresh's parts in-process, without training: the gate, dates, partitions, the lock and
the registry's publish/verify/recover."""

from __future__ import annotations

import json
import re
from datetime import date

import pytest

from ctrscale.config import ConfigError, load_config
from ctrscale.errors import CtrscaleError, DataError
from ctrscale.jobs.partitions import (
    day_number,
    ensure_partition,
    partition_dir,
    partition_problem,
    raw_file,
)
from ctrscale.jobs.refresh import (
    DayResult,
    RefreshJob,
    gate,
    overall_exit_code,
    requested_days,
)
from ctrscale.jobs.registry import Registry, RegistryError
from ctrscale.jobs.remote_registry import RemoteRegistry


def scores(auc: float, logloss: float = 0.45) -> dict[str, float]:
    return {"auc": auc, "logloss": logloss}


@pytest.mark.parametrize(
    ("candidate", "previous", "tolerance", "publish"),
    [
        (scores(0.70), None, 0.001, True),  # first model: only the floor applies
        (scores(0.45), None, 0.001, False),  # below min_auc 0.5
        (scores(0.7995), scores(0.80), 0.001, True),  # within the tolerance
        (scores(0.7985), scores(0.80), 0.001, False),
        (scores(0.80), scores(0.80), -0.001, False),  # negative: an improvement is required
        (scores(float("nan")), scores(0.80), 0.001, False),
        (scores(0.81, float("inf")), scores(0.80), 0.001, False),
        (scores(0.70), scores(float("nan")), 0.001, True),  # a broken baseline does not block
    ],
)
def test_gate(candidate, previous, tolerance, publish):
    decision = gate(candidate, previous, tolerance, min_auc=0.5)
    assert decision.publish is publish
    assert decision.reason


def test_requested_days():
    assert requested_days("2024-02-28") == [date(2024, 2, 28)]
    assert requested_days(None, "2024-02-28", "2024-03-01") == [
        date(2024, 2, 28),
        date(2024, 2, 29),
        date(2024, 3, 1),
    ]
    for bad in [("2024-13-01",), (None, "2024-01-02", "2024-01-01"), (None, "2024-01-01")]:
        with pytest.raises(CtrscaleError):
            requested_days(*bad)


def test_overall_exit_code():
    def result(code):
        return DayResult("2024-01-01", "x", code)

    assert overall_exit_code([result(0), result(0)]) == 0
    assert overall_exit_code([result(3), result(0)]) == 3
    assert overall_exit_code([result(3), result(2)]) == 2
    assert overall_exit_code([]) == 0


def test_dates_map_to_partitions_and_raw_files(tmp_path):
    day = date(2024, 3, 9)
    assert day_number(day) == 20240309
    assert partition_dir(tmp_path, day) == tmp_path / "day=20240309"
    assert str(raw_file("raw/{date}/day_{yyyymmdd}.tsv.gz", day)) == (
        "raw/2024-03-09/day_20240309.tsv.gz"
    )
    with pytest.raises(ConfigError, match=re.escape("only {date} and {yyyymmdd}")):
        load_config(None, ['refresh.raw_pattern="raw/{day}.tsv"'])


def test_the_job_refuses_settings_it_owns():
    for override in ["data.train=['x']", "data.eval=['x']", "train.warm_start='x'"]:
        with pytest.raises(CtrscaleError, match="set by the refresh job"):
            RefreshJob(load_config(None, [override]))
    with pytest.raises(CtrscaleError, match="holdout_fraction > 0"):
        RefreshJob(load_config(None, ["data.holdout_fraction=0"]))


def test_partitions_are_verified_and_prepared_again_when_damaged(tmp_path):
    from ctrscale.data.synth import generate

    generate(
        tmp_path / "raw", 3000, days=1, cardinality_scale=0.0003, fmt="tsv", first_day=20240101
    )
    refresh = load_config(
        None,
        [
            f'refresh.dataset="{tmp_path / "ds"}"',
            f'refresh.raw_pattern="{tmp_path / "raw" / "day_{yyyymmdd}.tsv"}"',
            "refresh.table_size=64",
        ],
    ).refresh
    day = date(2024, 1, 1)
    partition = ensure_partition(refresh, day, required=True)
    assert partition == tmp_path / "ds" / "day=20240101"
    assert partition_problem(partition) is None
    part = next(partition.glob("*.parquet"))

    with open(part, "ab") as handle:  # a damaged file: re-prepared, not trusted
        handle.write(b"\0")
    assert "sha256" in partition_problem(partition)
    assert ensure_partition(refresh, day, required=True) == partition
    assert partition_problem(partition) is None

    (partition / "part-09999.parquet").write_bytes(part.read_bytes())
    assert "differ from the manifest" in partition_problem(partition)
    (partition / "part-09999.parquet").unlink()
    (partition / "_manifest.json").unlink()
    assert partition_problem(partition) == "no _manifest.json"

    # A day without partition or raw file: optional days are left out, the new day is required.
    assert ensure_partition(refresh, date(2023, 12, 31), required=False) is None
    with pytest.raises(DataError, match="no raw input"):
        ensure_partition(refresh, date(2023, 12, 31), required=True)


def fake_checkpoint(path, content: bytes = b"weights"):
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(content)
    (path / ".metadata").write_bytes(b"meta")
    (path / "state.json").write_text('{"step": 4}')
    return path


def test_publish_verify_and_recover(tmp_path):
    registry = Registry(tmp_path / "reg")
    config = tmp_path / "train.toml"
    config.write_text("[train]\n")
    for day in ["2024-01-01", "2024-01-02"]:
        registry.publish(day, fake_checkpoint(tmp_path / day), config, {"date": day})
        registry.verify(day)
        assert registry.latest() == day
    assert registry.published_dates() == ["2024-01-01", "2024-01-02"]
    manifest = json.loads((registry.model_dir("2024-01-02") / "manifest.json").read_text())
    assert {entry["path"] for entry in manifest["files"]} == {
        "checkpoint/__0_0.distcp",
        "checkpoint/.metadata",
        "checkpoint/state.json",
        "config.toml",
        "metrics.json",
    }
    with pytest.raises(RegistryError, match="already exists"):
        registry.publish("2024-01-02", tmp_path / "2024-01-02", config, {})

    (registry.checkpoint("2024-01-01") / "__0_0.distcp").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="sha256"):
        registry.verify("2024-01-01")
    (registry.checkpoint("2024-01-01") / "extra").write_bytes(b"")
    with pytest.raises(RegistryError, match="unlisted"):
        registry.verify("2024-01-01")

    # A crash between the rename and the pointer switch: recover() finishes the publish.
    (registry.root / "publishing").write_text("2024-01-02\n")
    (registry.root / "latest").write_text("2024-01-01\n")
    leftover = registry.root / "models" / ".tmp-2024-01-03-deadbeef"
    leftover.mkdir()
    (registry.work_dir("2024-01-02") / "run").mkdir(parents=True)
    registry.recover()
    assert registry.latest() == "2024-01-02"
    assert not leftover.exists()
    assert not (registry.root / "publishing").exists()
    assert not registry.work_dir("2024-01-02").exists()

    # Without a journal, an older `latest` is an operator's rollback and stays.
    (registry.root / "latest").write_text("2024-01-01\n")
    registry.recover()
    assert registry.latest() == "2024-01-01"


def test_a_remote_publish_uploads_the_manifest_last_and_never_moves_latest_back(tmp_path):
    registry = Registry(tmp_path / "reg")
    (tmp_path / "train.toml").write_text("[train]\n")
    for day in ["2024-01-01", "2024-01-02"]:
        registry.publish(day, fake_checkpoint(tmp_path / day), tmp_path / "train.toml", {})
    # A local directory through pyarrow.fs stands in for the bucket here (tests/jobs/
    # test_refresh_job.py publishes to a real S3 server and kills it mid-upload).
    remote = RemoteRegistry(f"file://{tmp_path / 'bucket'}")
    uploaded: list[str] = []
    original = remote.store.upload
    remote.store.upload = lambda source, *parts: (
        uploaded.append(parts[-1]) or original(source, *parts)
    )
    remote.publish("2024-01-02", registry.model_dir("2024-01-02"))
    assert uploaded[-1] == "manifest.json" and len(uploaded) == 6
    assert remote.latest() == "2024-01-02"
    remote.publish("2024-01-01", registry.model_dir("2024-01-01"))  # a late older day
    assert remote.is_published("2024-01-01") and remote.latest() == "2024-01-02"
    remote.verify("2024-01-01")

    uploaded.clear()
    remote.publish("2024-01-02", registry.model_dir("2024-01-02"))  # already there: no upload
    assert uploaded == []
    (tmp_path / "bucket/models/2024-01-01/checkpoint/__0_0.distcp").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="sha256"):
        remote.verify("2024-01-01")
    with pytest.raises(RegistryError, match=r"no manifest\.json"):
        remote.verify("2024-01-03")
