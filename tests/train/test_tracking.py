"""Where a run reports besides metrics.jsonl: MLflow (a local file store), TensorBoard, and the
loss/AUC plot of every run directory; a sweep's and a refresh's runs as MLflow child runs."""

from __future__ import annotations

import json
import sys

import pytest
from runner import metrics, run_ctrscale, tiny_overrides, train_args
from support import REPO_ROOT

from ctrscale.errors import CtrscaleError
from ctrscale.train.tracking import flat_settings, import_mlflow, mlflow_name, numbers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_a_records_numbers_are_flattened_to_kind_slash_key_and_other_values_skipped():
    record = {"loss": 0.5, "epoch": 1, "lr": {"dense": 0.1, "embedding": 0.01}, "ok": True,
              "note": "text", "buckets": {"<5": 0.7}}  # fmt: skip
    assert dict(numbers("train", record)) == {
        "train/loss": 0.5,
        "train/epoch": 1.0,
        "train/lr/dense": 0.1,
        "train/lr/embedding": 0.01,
        "train/buckets/<5": 0.7,
    }


def test_metric_names_are_spelled_as_mlflow_allows():
    assert [mlflow_name(n) for n in ("eval/buckets/<5/auc", "eval/buckets/5–99", "a/≥100")] == [
        "eval/buckets/lt5/auc",
        "eval/buckets/5-99",
        "a/ge100",
    ]


def test_settings_become_dotted_parameters():
    assert flat_settings({"optim": {"dense": {"lr": 0.1, "betas": [0.9, 0.99]}}, "x": None}) == {
        "optim.dense.lr": "0.1",
        "optim.dense.betas": "[0.9, 0.99]",
        "x": "null",
    }


def test_mlflow_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(CtrscaleError, match=r"pip install 'ctrscale\[mlflow\]'"):
        import_mlflow()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A local MLflow file store (MLflow 3 wants MLFLOW_ALLOW_FILE_STORE for it)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow = pytest.importorskip("mlflow")
    uri = f"file:{tmp_path / 'mlruns'}"
    return uri, mlflow.MlflowClient(tracking_uri=uri)


def all_runs(client, experiment="ctrscale"):
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def steps_of(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_a_run_logs_to_mlflow_and_tensorboard_and_resumes_into_the_same_mlflow_run(
    tiny_dataset, tmp_path, mlflow_store
):
    uri, client = mlflow_store
    settings = {"train.max_steps": 4, "train.eval_every_steps": 2, "train.tensorboard": True,
                "tracking.mlflow_uri": uri, "train.checkpoint_every_steps": 2}  # fmt: skip
    run = tmp_path / "run"
    run_ctrscale(train_args(run, tiny_overrides(tiny_dataset, **settings)))
    (logged,) = all_runs(client)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    assert logged.data.params["optim.dense.lr"] == "0.003"
    scaled = metrics(run)["hyperparameters"]
    assert float(logged.data.params["scaled.dense_lr"]) == pytest.approx(scaled["dense_lr"])
    assert steps_of(client, logged.info.run_id, "train/loss") == [2, 4]
    assert steps_of(client, logged.info.run_id, "eval/auc") == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"config.toml", "plan.txt", "metrics.json", "curves.png"} <= artifacts
    assert (run / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    longer = tiny_overrides(tiny_dataset, **{**settings, "train.max_steps": 6})
    run_ctrscale([*train_args(run, longer), "--resume"])
    (resumed,) = all_runs(client)
    assert resumed.info.run_id == logged.info.run_id and resumed.info.status == "FINISHED"
    assert steps_of(client, resumed.info.run_id, "train/loss") == [2, 4, 6]


def test_a_failed_run_is_marked_failed(tiny_dataset, tmp_path, mlflow_store):
    uri, client = mlflow_store
    settings = {"train.max_steps": 4, "tracking.mlflow_uri": uri, "optim.dense.lr": 1e30,
                "optim.embedding.lr": 1e30, "optim.dense.name": "sgd"}  # fmt: skip
    done = run_ctrscale(
        train_args(tmp_path / "run", tiny_overrides(tiny_dataset, **settings)), check=False
    )
    assert done.returncode != 0 and "training loss became" in done.stderr
    (logged,) = all_runs(client)
    assert logged.info.status == "FAILED"


def test_a_sweeps_cells_are_child_runs_of_the_sweep(tmp_path, mlflow_store):
    uri, client = mlflow_store
    out = tmp_path / "sweep"
    tracking = f"tracking.mlflow_uri={json.dumps(uri)}"
    args = ["bench", "auc-vs-batch", "--config", str(REPO_ROOT / "pipelines" / "quick.toml"),
            "--out", str(out), "--batch-sizes", "1024", "4096", "--rules", "none",
            "--set", tracking, "--set", "train.epochs=1"]  # fmt: skip
    run_ctrscale(args)
    runs = {run.info.run_name: run for run in all_runs(client)}
    assert set(runs) == {"sweep sweep", "none batch 1,024 seed 0", "none batch 4,096 seed 0"}
    parent = runs.pop("sweep sweep")
    assert parent.info.status == "FINISHED" and parent.data.params["rules"] == "['none']"
    assert "results.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    for child in runs.values():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
