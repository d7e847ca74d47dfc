"""SWAP: the averages, the data hand-off from phase 1 to the replicas, and the job end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from runner import final_parameters, metrics, run_ctrscale, tiny_overrides, train_args

from ctrscale.config import DataConfig
from ctrscale.data.loader import ParquetBatchLoader
from ctrscale.data.schema import SPARSE_FEATURES
from ctrscale.errors import CtrscaleError
from ctrscale.train.averaging import average, touch_counts


def test_the_plain_average_of_two_replicas():
    """seed-methods.md's oracle: replicas [1, 2] and [3, 4] average to [2, 3]."""
    result = average([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])])
    assert result.tolist() == [2.0, 3.0]


def test_touch_weights_keep_a_row_only_one_replica_moved():
    """Phase 1 left both rows at 0; replica A's data looked row 0 up 3 times and moved it to 1,
    replica B never saw it. The plain mean halves A's update; weighted by touches it stays.
    Row 1: touched 1 and 3 times → (1·2 + 3·6) / 4 = 5. Row 2, untouched: the plain mean."""
    a = torch.tensor([[1.0, 1.0], [2.0, 2.0], [7.0, 7.0]])
    b = torch.tensor([[0.0, 0.0], [6.0, 6.0], [9.0, 9.0]])
    touches = [torch.tensor([3, 1, 0]), torch.tensor([0, 3, 0])]
    assert average([a, b])[0].tolist() == [0.5, 0.5]
    weighted = average([a, b], touches)
    assert weighted.tolist() == [[1.0, 1.0], [5.0, 5.0], [8.0, 8.0]]


def test_touch_counts_follow_each_replicas_own_shard(tiny_dataset):
    """Counting over global batches of W × b rows, slice i per replica, gives what replica i's
    own loader (shard i of W) reads."""
    data = DataConfig(train=[str(tiny_dataset)], shuffle_buffer_rows=8192)
    whole = ParquetBatchLoader.from_config(data, "train", seed=0, batch_size=1024)
    counted = touch_counts(whole, 2, whole.table_sizes)
    for replica in range(2):
        own = ParquetBatchLoader.from_config(data, "train", replica, 2, seed=0, batch_size=1024)
        expected = {f: np.zeros(own.table_sizes[f], dtype=np.int64) for f in SPARSE_FEATURES}
        for batch in own:  # counted at once: the loader reuses its decode buffers
            for feature in SPARSE_FEATURES:
                ids = batch.sparse_features[feature].values().numpy()
                expected[feature] += np.bincount(ids, minlength=own.table_sizes[feature])
        for feature in SPARSE_FEATURES:
            assert np.array_equal(counted[replica][feature].numpy(), expected[feature]), feature
    assert sum(int(c["C1"].sum()) for c in counted) == whole.num_batches() * 1024


def test_a_loader_continues_another_batch_sizes_cursor_at_the_same_row(tiny_dataset):
    data = DataConfig(train=[str(tiny_dataset)], shuffle_buffer_rows=8192)
    large = ParquetBatchLoader.from_config(data, "train", seed=5, batch_size=2048)
    batches = iter(large)
    for _ in range(3):
        next(batches)
    small = ParquetBatchLoader.from_config(data, "train", seed=0, batch_size=512)
    small.continue_from(large.state_dict())
    assert small.state_dict()["batches_done"] == 12 and small.seed == 5
    reference = ParquetBatchLoader.from_config(data, "train", seed=5, batch_size=512)
    expected = [b.labels.clone() for _, b in zip(range(14), reference, strict=False)][12:]
    got = [b.labels.clone() for _, b in zip(range(2), small, strict=False)]
    for left, right in zip(got, expected, strict=True):
        assert torch.equal(left, right)
    odd = ParquetBatchLoader.from_config(data, "train", seed=5, batch_size=1280)
    with pytest.raises(CtrscaleError, match="not a multiple of this run's global batch"):
        odd.continue_from(large.state_dict())


@pytest.mark.slow
def test_a_warm_start_that_continues_the_data_ends_like_the_uninterrupted_run(
    tiny_dataset, tmp_path
):
    """The hand-off of SWAP's phases: weights, optimizer state, the data position and the step
    count all carry over, so continuing at the same batch size is a resume, bitwise."""
    overrides = tiny_overrides(tiny_dataset, **{"optim.embedding.name": "adam"})
    run_ctrscale(train_args(tmp_path / "straight", overrides))
    run_ctrscale(train_args(tmp_path / "first", [*overrides, "train.max_steps=4"]))
    continued = [
        *overrides,
        f'train.warm_start="{tmp_path / "first" / "checkpoints"}"',
        "train.warm_start_continue_data=true",
    ]
    run_ctrscale(train_args(tmp_path / "second", continued))
    straight, second = metrics(tmp_path / "straight"), metrics(tmp_path / "second")
    assert second["steps"] == straight["steps"] == 10
    assert (second["auc"], second["logloss"]) == (straight["auc"], straight["logloss"])


def test_training_stops_at_the_first_record_below_a_loss(tiny_dataset, tmp_path):
    """SWAP's phase 1 may end at a training-loss threshold: 10 is below any first record."""
    overrides = tiny_overrides(tiny_dataset, **{"train.stop_below_loss": 10.0})
    run_ctrscale(train_args(tmp_path / "run", overrides))
    assert metrics(tmp_path / "run")["steps"] == 2  # the first record (log_every_steps = 2)


SWAP = {
    "swap.replicas": 2,
    "swap.replica_batch_size": 512,
    "swap.parallel": 2,
    "swap.phase1_nproc": 2,  # phase 1 under torchrun; the replicas re-shard its checkpoint
    "swap.phase1_fraction": 0.5,
    "swap.bn_batches": 4,
    "model.batch_norm": True,
    "model.ghost_batch_size": 256,
}


@pytest.mark.slow
def test_swap_trains_replicas_on_the_rest_of_the_data_and_averages_them(tiny_dataset, tmp_path):
    out = tmp_path / "swap"
    args = ["swap", "--out", str(out)]
    for override in tiny_overrides(tiny_dataset, **SWAP):
        args += ["--set", override]
    summary = json.loads(run_ctrscale(args).stdout.strip().splitlines()[-1])

    # Phase 1: half of the 10 steps of 2,048 rows; the replicas then read global batches of
    # 2 × 512 from row 10,240 (batch 10 of 21) to the end of the epoch: 11 steps each.
    assert metrics(out / "phase1")["steps"] == 5
    assert metrics(out / "phase1")["world_size"] == 2
    assert [r["steps"] for r in summary["replicas"]] == [21, 21]
    lines = (out / "replica-1" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["kind"] == "train" and first["step"] == 12  # logged every 2 steps from 10
    assert summary["average"] == "touch_weighted"
    assert summary["auc"] == metrics(out / "averaged")["auc"]

    phase1 = final_parameters(out / "phase1", tmp_path)
    replicas = [final_parameters(out / f"replica-{i}", tmp_path) for i in range(2)]
    averaged = final_parameters(out / "averaged", tmp_path)
    # Dense weights: the plain mean. Batch-norm statistics: re-estimated, not averaged.
    checked = 0
    for name, value in averaged.items():
        if "embedding_bags" in name or "running" in name or "num_batches" in name:
            continue
        torch.testing.assert_close(value, (replicas[0][name] + replicas[1][name]) / 2)
        checked += 1
    assert checked > 0
    running = [n for n in averaged if n.endswith("running_mean")]
    assert running
    assert not torch.allclose(
        averaged[running[0]], (replicas[0][running[0]] + replicas[1][running[0]]) / 2
    )
    # Tables: a row one replica moved keeps that replica's value; rows neither touched keep
    # phase 1's; a row both moved lies between theirs.
    table = next(n for n in averaged if n.endswith("embedding_bags.C3.weight"))
    start, (a, b), mean = phase1[table], (r[table] for r in replicas), averaged[table]
    moved_a, moved_b = (a != start).any(1), (b != start).any(1)
    only_a = moved_a & ~moved_b
    assert only_a.any() and (moved_a & moved_b).any() and (~moved_a & ~moved_b).any()
    torch.testing.assert_close(mean[only_a], a[only_a])
    torch.testing.assert_close(mean[~moved_a & ~moved_b], start[~moved_a & ~moved_b])
    assert not torch.allclose(mean[moved_a & moved_b], a[moved_a & moved_b])

    # Rerunning finishes nothing twice; with `mean` only phase 3 runs again.
    phase1_log = (out / "phase1" / "metrics.jsonl").read_text()
    shutil.rmtree(out / "averaged")
    rerun = [*args, "--set", 'swap.average="mean"']
    summary = json.loads(run_ctrscale(rerun).stdout.strip().splitlines()[-1])
    assert (out / "phase1" / "metrics.jsonl").read_text() == phase1_log
    assert summary["average"] == "mean"
    plain = final_parameters(out / "averaged", tmp_path)[table]
    torch.testing.assert_close(plain[only_a], (a[only_a] + b[only_a]) / 2)
