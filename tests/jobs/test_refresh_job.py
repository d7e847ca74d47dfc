"""`ctrscale refresh` end to end on CPU with synthetic days: publishing, the gates, exit codes,
the lock, and kill -9 at every stage followed by a rerun."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from jobs.harness import assert_dataset_consistent, assert_registry_consistent
from support import s3_filesystem

from ctrscale.data.schema import read_metadata
from ctrscale.errors import ExitCode
from ctrscale.jobs.refresh import LOCK_FILE
from ctrscale.jobs.remote_registry import RemoteRegistry
from ctrscale.locking import ExclusiveLock

DAYS = ["2024-01-01", "2024-01-02", "2024-01-03"]


def statuses(result) -> list[str]:
    return [day["status"] for day in result.summary["days"]]


def test_three_days_publish_three_models_with_stable_ids(refresh):
    first = refresh.run("--from", DAYS[0], "--to", DAYS[-1])
    assert first.code == ExitCode.OK, first
    assert statuses(first) == ["published"] * 3
    assert first.summary["latest"] == DAYS[-1]
    assert_registry_consistent(refresh.registry, DAYS, latest=DAYS[-1])

    assert_dataset_consistent(refresh.dataset, [20240101, 20240102, 20240103])
    # One encoding for the whole dataset, recorded by every model it trained.
    meta = read_metadata(refresh.dataset)
    assert sorted(meta["days"]) == ["20240101", "20240102", "20240103"]
    assert set(meta["table_sizes"].values()) == {4096}
    records = [
        json.loads((refresh.registry / "models" / d / "metrics.json").read_text()) for d in DAYS
    ]
    assert len({record["data"]["encoding_sha256"] for record in records}) == 1
    # Each day warm-starts from the one before and is compared with it on its own slice.
    assert [record["warm_start"] for record in records] == [None, DAYS[0], DAYS[1]]
    assert [(record["previous"] or {}).get("date") for record in records] == [None, *DAYS[:2]]
    assert all(record["decision"]["publish"] for record in records)
    assert all(record["candidate"]["rows"] > 1000 for record in records)

    # The replay is resumable: published days are skipped, partitions are not prepared again.
    again = refresh.run("--from", DAYS[0], "--to", DAYS[-1])
    assert again.code == ExitCode.OK, again
    assert statuses(again) == ["already_published"] * 3
    # A single date behind `latest` would move it back in time.
    behind = refresh.run("--date", "2023-12-31")
    assert behind.code == ExitCode.BAD_INPUT, behind
    assert "move `latest` back" in behind.summary["days"][0]["error"]
    assert_registry_consistent(refresh.registry, DAYS, latest=DAYS[-1])


def test_a_corrupt_day_is_refused_and_latest_kept(refresh):
    assert refresh.run("--date", DAYS[0]).code == ExitCode.OK
    corrupt = refresh.raw / "day_20240102.tsv"
    lines = corrupt.read_text().splitlines()
    corrupt.unlink()  # a symlink to the shared day: replace it, do not write through it
    # Every 100th row with a broken label: 1% bad rows, over the 0.1% threshold.
    corrupt.write_text(
        "\n".join("x" + line[1:] if i % 100 == 0 else line for i, line in enumerate(lines)) + "\n"
    )

    result = refresh.run("--date", DAYS[1])
    assert result.code == ExitCode.BAD_INPUT, result
    assert result.summary["status"] == "bad_input"
    assert "rows rejected" in result.summary["days"][0]["error"]
    assert result.summary["latest"] == DAYS[0]
    assert not (refresh.dataset / "day=20240102").exists()
    assert_registry_consistent(refresh.registry, [DAYS[0]], latest=DAYS[0])

    # A missing raw day is bad input too.
    missing = refresh.run("--date", "2024-02-01")
    assert missing.code == ExitCode.BAD_INPUT, missing
    assert "no raw input" in missing.summary["days"][0]["error"]


def test_a_worse_candidate_is_not_published(refresh):
    assert refresh.run("--date", DAYS[0]).code == ExitCode.OK
    # A tolerance of -1 demands an AUC one above the published model's: impossible.
    rejected = refresh.run("--date", DAYS[1], **{"refresh.auc_tolerance": -1.0})
    assert rejected.code == ExitCode.REJECTED, rejected
    assert rejected.summary["status"] == "rejected"
    assert rejected.summary["latest"] == DAYS[0]
    record = json.loads((refresh.registry / "rejected" / DAYS[1] / "metrics.json").read_text())
    assert record["decision"]["publish"] is False
    assert record["previous"]["date"] == DAYS[0]
    assert record["candidate"]["auc"] < record["previous"]["auc"] + 1
    assert_registry_consistent(refresh.registry, [DAYS[0]], latest=DAYS[0])

    # Run again with the normal gate (from scratch this time): published, rejection cleared.
    accepted = refresh.run("--date", DAYS[1], "--from-scratch")
    assert accepted.code == ExitCode.OK, accepted
    assert not (refresh.registry / "rejected" / DAYS[1]).exists()
    record = json.loads((refresh.registry / "models" / DAYS[1] / "metrics.json").read_text())
    assert record["warm_start"] is None
    assert_registry_consistent(refresh.registry, DAYS[:2], latest=DAYS[1])


def test_a_second_refresh_fails_fast_while_the_registry_is_locked(refresh):
    with ExclusiveLock(refresh.registry / LOCK_FILE, "held by this test"):
        started = time.monotonic()
        blocked = refresh.run("--date", DAYS[0])
        elapsed = time.monotonic() - started
    assert blocked.code == ExitCode.LOCKED, blocked
    assert blocked.summary["status"] == "locked"
    assert "another `ctrscale refresh`" in blocked.summary["error"]
    assert elapsed < 60  # no waiting, no training: python start-up and the lock attempt
    assert not (refresh.dataset / "day=20240101").exists()


def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the refresh ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.02)


def _kill_9(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_kill_9_during_training_then_rerun_resumes(refresh, tmp_path):
    assert refresh.run("--date", DAYS[0]).code == ExitCode.OK
    # Long enough (96 steps) to be killed mid-way, after two checkpoints.
    longer = {"train.epochs": 12, "train.checkpoint_every_steps": 10}
    run = refresh.registry / "work" / DAYS[1] / "run"
    process = refresh.start("--date", DAYS[1], log=tmp_path / "killed.log", **longer)
    _wait_for(lambda: (run / "checkpoints" / "step-00000020").exists(), process, "step 20")
    _kill_9(process)
    assert not (run / "metrics.json").exists(), "training finished before the kill"
    assert "pid" in (refresh.registry / ".lock").read_text()  # the dead run's trace

    rerun = refresh.run("--date", DAYS[1], **longer)
    assert rerun.code == ExitCode.OK, rerun
    assert "took over the lock left by pid" in rerun.stderr
    assert "resuming the interrupted training" in rerun.stderr
    record = json.loads((refresh.registry / "models" / DAYS[1] / "metrics.json").read_text())
    assert record["training"]["steps"] == 96
    assert_registry_consistent(refresh.registry, DAYS[:2], latest=DAYS[1])
    assert_dataset_consistent(refresh.dataset, [20240101, 20240102])


@pytest.mark.slow
@pytest.mark.parametrize("point", ["publish", "rename", "latest"])
def test_kill_9_during_publishing_then_rerun_completes(refresh, tmp_path, point):
    assert refresh.run("--date", DAYS[0]).code == ExitCode.OK
    log = tmp_path / "killed.log"
    process = refresh.start("--date", DAYS[1], log=log, pause_before=point)
    marker = f"CTRSCALE_TEST_PAUSE_BEFORE={point}: pausing"
    _wait_for(lambda: marker in log.read_text(), process, f"the pause before {point}")
    if point == "publish":  # the paused run holds the lock: a second one must not start
        blocked = refresh.run("--date", DAYS[1])
        assert blocked.code == ExitCode.LOCKED, blocked
        assert f"pid {process.pid}" in blocked.summary["error"]
    _kill_9(process)
    staged = list((refresh.registry / "models").glob(".tmp-*"))
    assert bool(staged) == (point == "rename")  # killed with a complete, unrenamed copy
    assert (refresh.registry / "latest").read_text().strip() == DAYS[0]

    rerun = refresh.run("--date", DAYS[1])
    assert rerun.code == ExitCode.OK, rerun
    # Killed after the rename, the model was already complete: the rerun only finishes the
    # pointer switch; before it, the rerun resumes the finished training and publishes.
    expected = "already_published" if point == "latest" else "published"
    assert statuses(rerun) == [expected]
    assert_registry_consistent(refresh.registry, DAYS[:2], latest=DAYS[1])
    assert_dataset_consistent(refresh.dataset, [20240101, 20240102])


@pytest.mark.slow
def test_torchrun_training_with_a_window_and_next_day_holdout(refresh):
    """refresh.nproc=2: training and both evaluations run under torchrun (2 gloo processes);
    two-day window; the gate slice is the whole next day."""
    settings = {"refresh.nproc": 2, "refresh.window_days": 2, "refresh.holdout": "next_day"}
    result = refresh.run("--from", DAYS[1], "--to", DAYS[2], **settings)
    assert result.code == ExitCode.OK, result
    assert statuses(result) == ["published", "published"]
    records = [
        json.loads((refresh.registry / "models" / d / "metrics.json").read_text()) for d in DAYS[1:]
    ]
    assert [record["training"]["world_size"] for record in records] == [2, 2]
    assert [Path(p).name for p in records[1]["data"]["train"]] == ["day=20240102", "day=20240103"]
    assert records[1]["gate_slice"]["data"]["eval"] == [str(refresh.dataset / "day=20240104")]
    assert records[1]["candidate"]["rows"] == records[1]["previous"]["rows"] == 20_000
    assert_registry_consistent(refresh.registry, DAYS[1:], latest=DAYS[2])


def test_a_days_refresh_is_an_mlflow_run_with_its_gate_and_its_training_as_child(
    refresh, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the harness passes our environment
    mlflow = pytest.importorskip("mlflow")
    uri = f"file:{tmp_path / 'mlruns'}"
    result = refresh.run("--date", DAYS[0], **{"tracking.mlflow_uri": uri})
    assert result.code == ExitCode.OK, result
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ctrscale")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {f"refresh {DAYS[0]}", f"train {DAYS[0]}"}
    day, training = runs[f"refresh {DAYS[0]}"], runs[f"train {DAYS[0]}"]
    assert day.info.status == training.info.status == "FINISHED"
    assert training.data.tags["mlflow.parentRunId"] == day.info.run_id
    assert day.data.metrics["gate/publish"] == 1.0
    assert day.data.metrics["gate/candidate_auc"] == pytest.approx(
        result.summary["days"][0]["candidate_auc"]
    )
    assert "train/loss" in training.data.metrics


@pytest.mark.slow
def test_publishing_to_an_object_store_survives_a_kill_9_before_the_manifest(
    refresh, tmp_path, s3_endpoint
):
    s3_filesystem(s3_endpoint).create_dir("models")
    remote_uri = {"refresh.publish_uri": "s3://models/ctr"}
    assert refresh.run("--date", DAYS[0], **remote_uri).code == ExitCode.OK
    remote = RemoteRegistry("s3://models/ctr")
    assert remote.latest() == DAYS[0]
    remote.verify(DAYS[0])

    log = tmp_path / "killed.log"
    process = refresh.start(
        "--date", DAYS[1], log=log, pause_before="remote_manifest", **remote_uri
    )
    marker = "CTRSCALE_TEST_PAUSE_BEFORE=remote_manifest: pausing"
    _wait_for(lambda: marker in log.read_text(), process, "the pause before the manifest")
    _kill_9(process)
    # Every file of the new model is uploaded but its manifest is not: readers see only the
    # previous model, and `latest` still names it.
    assert not remote.is_published(DAYS[1]) and remote.latest() == DAYS[0]

    rerun = refresh.run("--date", DAYS[1], **remote_uri)
    assert rerun.code == ExitCode.OK, rerun
    assert remote.latest() == DAYS[1]
    remote.verify(DAYS[1])
    assert_registry_consistent(refresh.registry, DAYS[:2], latest=DAYS[1])
