"""Checkpoints are atomic, point to the newest complete one, verify every file, record the
config they were written with, and never unpickle code."""

import json
import os
import pickle

import pytest
import torch

from ctrscale.config import Config, load_config
from ctrscale.data.schema import sha256_file
from ctrscale.errors import CtrscaleError
from ctrscale.train import checkpoint

CONFIG = load_config(None, ["model.dnn=[7]"])


def save(directory, step, tensors, state=None, **kwargs):
    return checkpoint.save_checkpoint(directory, step, tensors, state or {}, CONFIG, **kwargs)


def test_save_then_load_round_trips_tensors_and_state(tmp_path, single_process_group):
    tensors = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optim": {"m": torch.ones(3)}}
    path = save(tmp_path, 5, tensors, {"epoch": 1, "loader": {"k": 2}})
    assert checkpoint.latest_checkpoint(tmp_path) == path

    target = {"model": {"w": torch.zeros(2, 3)}, "optim": {"m": torch.zeros(3)}}
    state = checkpoint.load_checkpoint(path, target)
    torch.testing.assert_close(target["model"]["w"], tensors["model"]["w"])
    torch.testing.assert_close(target["optim"]["m"], tensors["optim"]["m"])
    assert state == {"epoch": 1, "loader": {"k": 2}, "step": 5}


def test_latest_moves_forward_and_old_checkpoints_are_pruned(tmp_path, single_process_group):
    for step in (1, 2, 3):
        save(tmp_path, step, {"w": torch.full((2,), float(step))}, keep=2)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000003"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]


def test_an_unfinished_checkpoint_is_ignored(tmp_path, single_process_group):
    save(tmp_path, 1, {"w": torch.ones(2)})
    # What a crash mid-save leaves behind: a staging directory without the rename.
    (tmp_path / ".step-00000002.tmp").mkdir()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000001"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_loading_refuses_metadata_that_would_run_code(tmp_path, single_process_group):
    path = save(tmp_path, 1, {"w": torch.ones(2)})
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    # Whoever can write the metadata can write the manifest too: the unpickler must hold.
    manifest = json.loads((path / checkpoint.MANIFEST_FILE).read_text())
    manifest[".metadata"] = sha256_file(path / ".metadata")
    (path / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CtrscaleError, match=r"posix\.system|os\.system"):
        checkpoint.load_checkpoint(path, {"w": torch.zeros(2)})


def test_a_checkpoint_records_its_config_and_refuses_a_changed_file(tmp_path, single_process_group):
    path = save(tmp_path, 1, {"w": torch.ones(1000)})
    assert checkpoint.checkpoint_config(path) == CONFIG != Config()
    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1  # one bit
    shard.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=f"{shard} is corrupt"):
        checkpoint.load_checkpoint(path, {"w": torch.zeros(1000)})


@pytest.mark.parametrize("rank_sees_latest", [False, True])
def test_every_rank_meets_rank_0_after_it_fetches_the_store_copy(
    monkeypatch, tmp_path, rank_sees_latest
):
    # Rank 1 may look at the shared run directory before or after rank 0's download has
    # written `latest`; either way it must enter the barrier rank 0 waits in.
    class Mirror:
        def download_latest(self, directory):
            raise AssertionError("only rank 0 fetches the store's copy")

    barriers = []
    monkeypatch.setattr(checkpoint, "is_main_process", lambda: False)
    monkeypatch.setattr(checkpoint, "barrier", lambda: barriers.append(1))
    monkeypatch.setattr(checkpoint, "latest_checkpoint", lambda directory: None)
    if rank_sees_latest:
        (tmp_path / checkpoint.LATEST).write_text("step-00000002")
    rank_1 = checkpoint.Checkpointer(tmp_path, None, trainer=None, loader=None, mirror=Mirror())
    assert rank_1.restore() is None
    assert barriers == [1]
