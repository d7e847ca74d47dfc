"""`ctrscale train` end to end on CPU: outputs, determinism, sharding choices, equivalence of
world sizes, and crash-safe resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runner import final_parameters, metrics, run_ctrscale, tiny_overrides, train_args

from ctrscale.config import load_config
from ctrscale.distributed.context import child_environment


def test_train_writes_metrics_config_and_logs(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_dataset, **{"train.eval_every_steps": 4})
    done = run_ctrscale(train_args(out, overrides))

    result = metrics(out)
    assert {"auc", "logloss", "steps", "rows_per_s", "bayes_auc", "bayes_auc_gap"} <= set(result)
    assert 0.5 < result["auc"] <= result["bayes_auc"] < 1.0
    assert result["bayes_auc_gap"] == pytest.approx(result["bayes_auc"] - result["auc"])
    assert result["rows_per_s"] > 0
    # 24,000 rows, 10% held out, batches of 2,048, last partial batch dropped: 10 steps.
    assert result["steps"] == 10
    assert json.loads(done.stdout.strip().splitlines()[-1])["auc"] == result["auc"]

    saved = load_config(out / "config.toml")
    assert saved == load_config(None, overrides)

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["kind"] == "train"]
    eval_lines = [line for line in lines if line["kind"] == "eval"]
    assert [line["step"] for line in train_lines] == [2, 4, 6, 8, 10]
    assert {"loss", "rows_per_s", "lr", "epoch"} <= set(train_lines[0])
    assert set(train_lines[0]["lr"]) == {"embedding", "dense"}
    assert [line["step"] for line in eval_lines] == [4, 8, 10]
    assert eval_lines[-1]["auc"] == result["auc"]


def test_same_seed_gives_identical_metrics(tiny_dataset, tmp_path):
    overrides = tiny_overrides(tiny_dataset, **{"train.max_steps": 4})
    run_ctrscale(train_args(tmp_path / "a", overrides))
    run_ctrscale(train_args(tmp_path / "b", overrides))
    first, second = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for key in ("auc", "logloss", "steps"):
        assert first[key] == second[key]


def test_an_existing_run_is_not_overwritten_without_resume(tiny_dataset, tmp_path):
    overrides = tiny_overrides(tiny_dataset, **{"train.max_steps": 1})
    run_ctrscale(train_args(tmp_path / "run", overrides))
    again = run_ctrscale(train_args(tmp_path / "run", overrides), check=False)
    assert again.returncode != 0
    assert "pass --resume" in again.stderr


def test_row_wise_on_cpu_fails_early_and_says_what_is_possible(tiny_dataset, tmp_path):
    overrides = tiny_overrides(tiny_dataset, **{"distributed.sharding_type": "row_wise"})
    done = run_ctrscale(train_args(tmp_path / "run", overrides), check=False)
    assert done.returncode != 0
    assert "row_wise is not available with the gloo backend" in done.stderr
    assert "table_wise, column_wise, table_column_wise, data_parallel" in done.stderr


def test_data_parallel_tables_follow_the_embedding_optimizer(tiny_dataset, tmp_path):
    """Replicated tables get ordinary .grads; they must still be updated with the embedding
    optimizer's settings, giving what the fused table-wise kernel gives."""
    common = {"train.max_steps": 3}
    fused_out, replicated_out = tmp_path / "fused", tmp_path / "replicated"
    run_ctrscale(train_args(fused_out, tiny_overrides(tiny_dataset, **common)))
    replicated = {**common, "distributed.sharding_type": "data_parallel"}
    run_ctrscale(train_args(replicated_out, tiny_overrides(tiny_dataset, **replicated)))
    fused = final_parameters(fused_out, tmp_path)
    plain = final_parameters(replicated_out, tmp_path)
    table = "sparse_arch.embedding_bag_collection.embedding_bags.C3.weight"
    initial_std = 1e-2
    assert fused[table].std() > initial_std * 0.5  # trained, not left at init
    # Adagrad's first steps are ±lr (0.05) per element; the paths may differ by rounding only.
    for name in fused:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sharding", "transform"),
    [
        ("table_wise", "none"),
        ("column_wise", "none"),
        # Gradient transforms defined over the global batch: GSNR's k micro-batches are the
        # same rows on any world size, the past-gradient extrapolation uses all-reduced ones.
        ("table_wise", "gsnr"),
        ("table_wise", "past_extrapolation"),
        # Dense optimizers whose rule reads all-reduced gradients: SNGM's global norm, MCLR's
        # median curvature over layers, NovoGrad's per-tensor moments.
        ("table_wise", "sngm"),
        ("table_wise", "mclr"),
        ("table_wise", "novograd"),
        # Schedules over the global batch, in one run: the smallest losses of all ranks' rows
        # together, and a ramp joining loader batches on every rank alike.
        ("table_wise", "discard_and_ramp"),
        # DLRM with CowClip on column-split tables: every rank issues the one column-norm
        # all-reduce per step, also a rank that holds no split table (a mismatch deadlocks).
        ("column_wise", "dlrm_cowclip"),
    ],
)
def test_two_processes_match_one_process(tiny_dataset, tmp_path, sharding, transform):
    # Plain SGD everywhere: its update is linear in the gradient, so any difference between
    # the world sizes' gradients shows up unamplified (Adam/Adagrad turn rounding noise in a
    # near-zero gradient into a full ±lr step).
    overrides = tiny_overrides(
        tiny_dataset,
        **{
            "train.max_steps": 6,
            "distributed.sharding_type": sharding,
            "distributed.column_shard_dim": 4,  # 12-wide tables: 3 shards over both ranks
            "optim.embedding.name": "sgd",
            "optim.embedding.lr": 0.5,
            **dense_method(transform),
        },
    )
    run_ctrscale(train_args(tmp_path / "one", overrides))
    run_ctrscale(train_args(tmp_path / "two", overrides), nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert two["world_size"] == 2
    assert two["steps"] == one["steps"] == 6
    assert two["auc"] == pytest.approx(one["auc"], rel=1e-5)
    assert two["logloss"] == pytest.approx(one["logloss"], rel=1e-5)
    single = final_parameters(tmp_path / "one", tmp_path)
    double = final_parameters(tmp_path / "two", tmp_path)
    assert single.keys() == double.keys()
    # A transform feeds a gradient computed from gradients back into the step (a GSNR ratio,
    # an extrapolated point): summation-order rounding grows a little more, to ~1e-7 absolute.
    atol = 1e-7 if transform == "none" else 1e-6
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=1e-5, atol=atol)


@pytest.mark.slow
def test_ghost_batch_norm_gives_two_processes_the_weights_of_one(tiny_dataset, tmp_path):
    """Ghost batches of 256 rows: 1 process normalises its 2,048-row batch in 8 ghosts, each of
    2 ranks its 1,024 rows in 4 — the same 8, so the weights agree. The running statistics do
    not (each rank tracks its own ghosts; DDP broadcasts rank 0's), so they are not compared."""
    overrides = tiny_overrides(
        tiny_dataset,
        **{"train.max_steps": 4, "model.batch_norm": True, "model.ghost_batch_size": 256,
           **dense_method("none"), "optim.embedding.name": "sgd", "optim.embedding.lr": 0.5},
    )  # fmt: skip
    run_ctrscale(train_args(tmp_path / "one", overrides))
    run_ctrscale(train_args(tmp_path / "two", overrides), nproc=2)
    single = final_parameters(tmp_path / "one", tmp_path)
    double = final_parameters(tmp_path / "two", tmp_path)
    statistics = [name for name in single if "running_" in name or "num_batches" in name]
    assert statistics  # the model has batch norm
    weights = [name for name in single if name not in statistics]
    norms = {name.removesuffix("running_mean") for name in statistics if "running_mean" in name}
    assert {f"{norm}weight" for norm in norms} <= set(weights)  # their scales are compared
    for name in weights:
        torch.testing.assert_close(double[name], single[name], rtol=1e-5, atol=1e-7)


def dense_method(method: str) -> dict:
    """`none` or a gradient transform or schedule on plain SGD, or a dense optimizer by name."""
    sgd = {"optim.dense.name": "sgd", "optim.dense.lr": 0.05}
    if method == "discard_and_ramp":
        ramp = {"data.ramp_from_batch_size": 512, "data.ramp_steps": 4}
        return {**sgd, "train.discard_fraction": 0.25, **ramp}
    if method == "dlrm_cowclip":
        return {
            **sgd,
            "model.name": "dlrm",
            "optim.cowclip.mode": "paper",
            "optim.embedding.l2": 1e-4,
        }
    if method in ("none", "gsnr", "past_extrapolation", "extrapolation"):
        return {"optim.dense.name": "sgd", "optim.dense.lr": 0.05, "optim.dense.transform": method}
    return {"optim.dense.name": method, "optim.dense.lr": 0.05}


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "training ended before the first checkpoint"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_then_resume_ends_exactly_like_an_uninterrupted_run(tiny_dataset, tmp_path):
    overrides = tiny_overrides(
        tiny_dataset,
        **{"train.epochs": 2, "train.checkpoint_every_steps": 3, "train.eval_every_steps": 7},
    )
    run_ctrscale(train_args(tmp_path / "straight", overrides))

    crashed = tmp_path / "crashed"
    env = child_environment()
    process = subprocess.Popen(
        [sys.executable, "-m", "ctrscale", *train_args(crashed, overrides)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    _wait_for(crashed / "checkpoints" / "step-00000006" / "state.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (crashed / "metrics.json").exists()

    run_ctrscale([*train_args(crashed, overrides), "--resume"])
    straight, resumed = metrics(tmp_path / "straight"), metrics(crashed)
    for key in ("auc", "logloss", "steps", "bayes_auc"):
        assert resumed[key] == straight[key], key


@pytest.mark.slow
def test_resume_with_a_different_world_size(tiny_dataset, tmp_path):
    """2 processes checkpoint, 1 resumes, then 2 again: DCP re-shards the tables, and every
    rank's optimizer state matches the checkpoint's whatever the world size."""
    overrides = tiny_overrides(tiny_dataset, **{"train.max_steps": 4})
    run_ctrscale(train_args(tmp_path / "run", overrides), nproc=2)
    run_ctrscale([*train_args(tmp_path / "run", [*overrides, "train.max_steps=8"]), "--resume"])
    assert metrics(tmp_path / "run")["steps"] == 8
    assert metrics(tmp_path / "run")["world_size"] == 1
    more = [*overrides, "train.max_steps=10"]
    run_ctrscale([*train_args(tmp_path / "run", more), "--resume"], nproc=2)
    assert metrics(tmp_path / "run")["steps"] == 10
    assert metrics(tmp_path / "run")["world_size"] == 2


@pytest.mark.slow
def test_sharded_decoding_trains_scores_every_row_and_resumes_only_with_its_world_size(
    tiny_dataset, tmp_path
):
    """data.decode=sharded: each rank decodes its share. The run scores every eval row (one
    process scoring the same model agrees), resumes with 2 processes, and a mid-epoch resume
    with 1 is refused instead of reading rows twice or never."""
    overrides = tiny_overrides(tiny_dataset, **{"train.max_steps": 3, "data.decode": "sharded"})
    run = tmp_path / "run"
    started = run_ctrscale(train_args(run, overrides), nproc=2)
    assert "each rank decoding its share" in started.stderr + started.stdout
    single = run_ctrscale(
        ["evaluate", "--checkpoint", str(run), *(f"--set={o}" for o in overrides)]
    )
    scored = json.loads(single.stdout.strip().splitlines()[-1])
    assert scored["auc"] == pytest.approx(metrics(run)["auc"], abs=1e-9)

    longer = [*overrides, "train.max_steps=6"]
    refused = run_ctrscale([*train_args(run, longer), "--resume"], check=False)
    assert refused.returncode != 0
    assert "resume with the same number of processes" in refused.stderr
    run_ctrscale([*train_args(run, longer), "--resume"], nproc=2)
    assert metrics(run)["steps"] == 6 and metrics(run)["world_size"] == 2


def test_evaluate_and_warm_start_reuse_a_saved_model(tiny_dataset, tmp_path):
    trained = tmp_path / "trained"
    overrides = tiny_overrides(tiny_dataset, **{"train.max_steps": 5})
    run_ctrscale(train_args(trained, overrides))
    expected = metrics(trained)

    evaluated = run_ctrscale(
        ["evaluate", "--checkpoint", str(trained), *(f"--set={o}" for o in overrides)]
    )
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["auc"] == expected["auc"]

    # Warm-started with learning rates too small to move anything, a new run must score
    # what the saved model scores: it starts from those weights, not from a fresh init.
    frozen = {
        "train.max_steps": 1,
        "train.warm_start": str(trained),
        "train.warm_start_optimizer": False,
        "optim.embedding.name": "sgd",
        "optim.embedding.lr": 1e-12,
        "optim.dense.name": "sgd",
        "optim.dense.lr": 1e-12,
    }
    run_ctrscale(train_args(tmp_path / "warm", tiny_overrides(tiny_dataset, **frozen)))
    assert metrics(tmp_path / "warm")["auc"] == pytest.approx(expected["auc"], abs=1e-6)


@pytest.mark.parametrize(
    "state",
    [
        # Adam on CPU embeddings is the row form: its moments and step count must be
        # checkpointed (sharded like the tables).
        {"optim.embedding.name": "adam", "optim.embedding.lr": 0.01},
        # The past-gradient extrapolation carries last step's gradient into the next step.
        {"optim.dense.transform": "past_extrapolation"},
        # Each dense optimizer's own state: moments, momentum, previous gradients and weights.
        *({"optim.dense.name": name} for name in ("lambc", "novograd", "sngm", "cblr", "mclr")),
        {"optim.embedding.name": "rowwise_novograd", "optim.embedding.lr": 0.01},
    ],
    ids=[
        "adam-embeddings",
        "past-extrapolation",
        "lambc",
        "novograd",
        "sngm",
        "cblr",
        "mclr",
        "rowwise-novograd-embeddings",
    ],
)
def test_stop_and_resume_with_optimizer_state_is_exact(tiny_dataset, tmp_path, state):
    """A resumed run ends bitwise like an uninterrupted one."""
    straight = tiny_overrides(tiny_dataset, **state, **{"train.max_steps": 4})
    run_ctrscale(train_args(tmp_path / "straight", straight))
    first_half = tiny_overrides(tiny_dataset, **state, **{"train.max_steps": 2})
    run_ctrscale(train_args(tmp_path / "resumed", first_half))
    run_ctrscale([*train_args(tmp_path / "resumed", straight), "--resume"])
    expected, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert resumed["steps"] == expected["steps"] == 4
    assert resumed["auc"] == expected["auc"]
    assert resumed["logloss"] == expected["logloss"]
