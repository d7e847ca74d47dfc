"""The batch-size ramp: the batch doubles on schedule, every row is trained on exactly once
per epoch, and a run stopped mid-ramp resumes exactly."""

import json

import pytest
import torch
from runner import run_ctrscale, tiny_overrides, train_args
from torchrec.datasets.utils import Batch

from ctrscale.config import DataConfig
from ctrscale.data.loader import ParquetBatchLoader
from ctrscale.errors import CtrscaleError
from ctrscale.train.ramp import Ramp, join


def test_the_batch_doubles_in_equal_stages_then_stays():
    ramp = Ramp.of(DataConfig(batch_size=1024, ramp_from_batch_size=256, ramp_steps=4))
    assert [ramp.joined(step) for step in range(7)] == [1, 1, 2, 2, 4, 4, 4]
    # 20 loader batches: 1+1+2+2+4+4+4, then the epoch's last step joins the 2 left.
    assert ramp.steps(batches_per_epoch=20, epochs=1) == (8, 8)
    assert ramp.steps(batches_per_epoch=20, epochs=2)[1] == 8 + 5


def test_a_ramp_must_double_to_the_batch_size():
    with pytest.raises(CtrscaleError, match="power of 2"):
        Ramp.of(DataConfig(batch_size=1000, ramp_from_batch_size=300, ramp_steps=4))
    assert Ramp.of(DataConfig(batch_size=1024)) is None


def test_joined_batches_keep_every_row_and_id_in_order(tiny_dataset):
    loader = ParquetBatchLoader(tiny_dataset, batch_size=64, shuffle=False)
    first, second = [batch for batch, _ in zip(loader, range(2), strict=False)]
    whole = next(iter(ParquetBatchLoader(tiny_dataset, batch_size=128, shuffle=False)))
    joined = join([first, second])
    assert isinstance(joined, Batch)
    torch.testing.assert_close(joined.dense_features, whole.dense_features)
    torch.testing.assert_close(joined.labels, whole.labels)
    assert joined.sparse_features.keys() == whole.sparse_features.keys()
    assert torch.equal(joined.sparse_features.values(), whole.sparse_features.values())


RAMP = {
    "data.ramp_from_batch_size": 512,
    "data.ramp_steps": 6,
    "train.checkpoint_every_steps": 3,
    "train.log_every_steps": 1,
}


def test_an_epoch_with_a_ramp_uses_every_row_once_and_resumes_exactly(tiny_dataset, tmp_path):
    straight = tiny_overrides(tiny_dataset, **RAMP)
    run_ctrscale(train_args(tmp_path / "straight", straight))
    loader = ParquetBatchLoader.from_config(
        DataConfig(train=[str(tiny_dataset)], batch_size=512), "train", seed=0
    )
    ramp = Ramp.of(DataConfig(batch_size=2048, ramp_from_batch_size=512, ramp_steps=6))
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["steps"] == ramp.steps(loader.num_batches(), 1)[1]
    final = tmp_path / "straight" / "checkpoints" / f"step-{metrics['steps']:08d}" / "state.json"
    assert json.loads(final.read_text())["rows_seen"] == loader.num_batches() * 512

    interrupted = tiny_overrides(tiny_dataset, **RAMP, **{"train.max_steps": 3})
    run_ctrscale(train_args(tmp_path / "resumed", interrupted))  # stops mid-ramp
    # A resumed run keeps its saved settings unless told otherwise: lift the step limit.
    whole = [*straight, f"train.max_steps={metrics['steps']}"]
    run_ctrscale([*train_args(tmp_path / "resumed", whole), "--resume"])
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert (resumed["auc"], resumed["logloss"]) == (metrics["auc"], metrics["logloss"])
