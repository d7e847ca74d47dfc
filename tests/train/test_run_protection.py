"""Runs that protect themselves and speak clearly: verified, self-describing checkpoints, one
run per directory, a divergence guard, data that must fit the model, resume bookkeeping, one
exit-code convention and a quiet terminal."""

from __future__ import annotations

import json
import math

import pytest
from runner import run_ctrscale, tiny_overrides, train_args
from support import REPO_ROOT

from ctrscale.errors import ExitCode
from ctrscale.locking import ExclusiveLock

SHORT = {"train.max_steps": 6, "train.checkpoint_every_steps": 3}


def train(out, dataset, check=True, extra=(), **settings):
    overrides = tiny_overrides(dataset, **{**SHORT, **settings})
    return run_ctrscale([*train_args(out, overrides), *extra], check=check)


def strict_json_lines(path) -> list[dict]:
    def refuse(token):
        raise AssertionError(f"{path}: non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(out, tiny_dataset)
    return out


def test_a_corrupt_checkpoint_file_is_an_error_naming_it(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    shard = next((copy / "checkpoints" / "step-00000006").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[100:8292] = bytes(8192)  # 8 KB overwritten inside the shard
    shard.write_bytes(bytes(data))
    done = run_ctrscale(["evaluate", "--checkpoint", str(copy)], check=False)
    assert done.returncode == ExitCode.BAD_INPUT
    assert f"{shard} is corrupt" in done.stderr


def test_evaluate_takes_its_configuration_from_the_checkpoint_and_names_the_step(finished_run):
    done = run_ctrscale(["evaluate", "--checkpoint", str(finished_run)])  # no --config
    result = json.loads(done.stdout.strip().splitlines()[-1])
    trained = json.loads((finished_run / "metrics.json").read_text())
    assert result["step"] == 6 and result["auc"] == pytest.approx(trained["auc"], abs=1e-9)
    written = json.loads((finished_run / "evaluate-step-6.json").read_text())
    assert written["auc"] == result["auc"]


def test_a_model_setting_that_contradicts_the_checkpoint_is_named(finished_run):
    done = run_ctrscale(
        ["evaluate", "--checkpoint", str(finished_run), "--set", "model.dnn=[64]"], check=False
    )
    assert done.returncode == ExitCode.BAD_INPUT
    assert "model.dnn: [32, 16] → [64]" in done.stderr


def test_a_warm_start_from_another_model_is_an_error_naming_the_keys(
    finished_run, tiny_dataset, tmp_path
):
    done = train(
        tmp_path / "warm",
        tiny_dataset,
        check=False,
        **{"train.warm_start": str(finished_run), "model.embedding_dim": 16},
    )
    assert done.returncode == ExitCode.BAD_INPUT
    assert "model.embedding_dim: 12 → 16" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_second_train_on_the_same_out_fails_fast_with_the_lock_code(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    with ExclusiveLock(out / ".lock", "a test holds it"):
        done = train(out, tiny_dataset, check=False)
    assert done.returncode == ExitCode.LOCKED
    assert "held by pid" in done.stderr
    assert not (out / "metrics.jsonl").exists()


def test_divergence_stops_with_its_code_and_never_saves_a_non_finite_model(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    done = train(
        out,
        tiny_dataset,
        check=False,
        **{"optim.dense.lr": 1e12, "optim.dense.name": "sgd", "train.log_every_steps": 1},
    )
    assert done.returncode == ExitCode.DIVERGED, done.stderr
    assert "between steps" in done.stderr and "Traceback" not in done.stderr
    records = strict_json_lines(out / "metrics.jsonl")  # strict JSON: no NaN tokens
    assert any(r["loss"] is None for r in records if r["kind"] == "train")
    for state in (out / "checkpoints").glob("step-*/state.json"):
        step = json.loads(state.read_text())["step"]
        good = [r for r in records if r["kind"] == "train" and r["step"] <= step]
        assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in good)


def test_eval_data_whose_tables_exceed_the_model_is_refused_before_training(tiny_dataset, tmp_path):
    from ctrscale.data.synth import generate

    bigger = tmp_path / "bigger"
    generate(bigger, rows_per_day=2000, days=1, seed=3, cardinality_scale=0.001)
    done = train(tmp_path / "run", tiny_dataset, check=False, **{"data.eval": [str(bigger)]})
    assert done.returncode == ExitCode.BAD_INPUT
    assert "do not fit the training data's tables" in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_keeps_one_record_per_step_and_says_where_it_resumed(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(out, tiny_dataset, **{"train.log_every_steps": 1})
    # As after a kill between the checkpoint at step 3 and the end: records up to 6 exist.
    checkpoints = out / "checkpoints"
    (checkpoints / "latest").write_text("step-00000003\n")
    (out / "metrics.json").unlink()
    done = train(out, tiny_dataset, extra=["--resume"], **{"train.log_every_steps": 1})
    assert "resumed from step 3" in done.stderr
    steps = [(r["kind"], r["step"]) for r in strict_json_lines(out / "metrics.jsonl")]
    assert len(steps) == len(set(steps)) and ("train", 6) in steps
    starts = json.loads((out / "run.json").read_text())["starts"]
    assert [start["resumed_from_step"] for start in starts] == [None, 3]
    assert {"ctrscale", "command", "host", "world_size", "precision"} <= set(starts[0])


def test_resume_refuses_an_empty_directory_and_a_changed_hyperparameter(
    finished_run, tiny_dataset, tmp_path
):
    empty = run_ctrscale(["train", "--out", str(tmp_path / "nothing"), "--resume"], check=False)
    assert empty.returncode == ExitCode.BAD_INPUT and "no run to resume" in empty.stderr
    changed = run_ctrscale(
        ["train", "--out", str(finished_run), "--resume", "--set", "optim.dense.lr=0.5"],
        check=False,
    )
    assert changed.returncode == ExitCode.BAD_INPUT
    assert "optim.dense.lr: 0.003 → 0.5" in changed.stderr


def test_resuming_a_finished_run_changes_nothing(finished_run):
    before = {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()}
    run_ctrscale(["train", "--out", str(finished_run), "--resume"])
    after = {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()}
    assert before == after


def test_an_unusable_out_is_a_one_line_error(tiny_dataset, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    done = train(not_a_dir, tiny_dataset, check=False)
    assert done.returncode == ExitCode.BAD_INPUT
    assert "a file, not a directory" in done.stderr and "Traceback" not in done.stderr


def test_the_terminal_shows_no_library_warnings(finished_run):
    done = run_ctrscale(["evaluate", "--checkpoint", str(finished_run)])
    noisy = [line for line in done.stderr.splitlines() if "warn" in line.lower()]
    assert noisy == []


@pytest.mark.parametrize("preset", ["synthetic-128x", "criteo-kaggle-paper", "quick"])
def test_every_preset_with_a_bench_table_is_usable_by_train(preset, tiny_dataset):
    done = run_ctrscale(
        [
            "train",
            "--config",
            str(REPO_ROOT / "pipelines" / f"{preset}.toml"),
            "--set",
            f"data.train={json.dumps([str(tiny_dataset)])}",
            "--set",
            "data.batch_size=1024",
            "--print-config",
        ]
    )
    assert "[model]" in done.stdout and '"embedding"' in done.stdout


def test_resume_may_change_where_the_run_reports_but_not_what_it_computes(tmp_path):
    from ctrscale.config import ConfigError, config_to_toml, load_config, user_settings
    from ctrscale.train.commands import resumed_config
    from ctrscale.train.loop import CONFIG_TOML

    (tmp_path / CONFIG_TOML).write_text(config_to_toml(load_config(None, [])))
    tracked = ['tracking.mlflow_uri="http://mlflow:5000"', "train.eval_every_steps=7"]
    resumed = resumed_config(user_settings(None, tracked), tmp_path, allow_changes=False)
    assert resumed.tracking.mlflow_uri == "http://mlflow:5000"
    with pytest.raises(ConfigError, match=r"optim\.dense\.lr"):
        resumed_config(user_settings(None, ["optim.dense.lr=0.5"]), tmp_path, allow_changes=False)
