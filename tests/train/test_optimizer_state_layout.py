"""One checkpoint layout for embedding optimizer state on both update paths: FBGEMM's fused
kernel state is saved as the row form's, so a model moves with its optimizer state between the
fused path and the row path — GPU fused Adam ↔ CPU row-form Adam, exercised here on CPU with
Adagrad (fused on CPU under lazy semantics, row form under dense)."""

from __future__ import annotations

import pytest
import torch
from runner import checkpoint_tensors, run_ctrscale, tiny_overrides, train_args


@pytest.mark.slow
def test_adagrad_state_moves_from_the_fused_to_the_row_path(tiny_dataset, tmp_path):
    """Fused (as FBGEMM's Adam on a GPU) to row form (as Adam on a CPU); the other way round
    reads the same keys."""
    first, then = "lazy", "dense"
    # No L2: under dense semantics rows outside the batch then get no gradient, so their
    # Adagrad sums must arrive unchanged from the other path's checkpoint.
    common = {"optim.embedding.l2": 0.0, "optim.cowclip.mode": "off"}
    source = tiny_overrides(
        tiny_dataset, **common, **{"train.max_steps": 3, "optim.embedding.semantics": first}
    )
    run_ctrscale(train_args(tmp_path / "source", source))
    target = tiny_overrides(
        tiny_dataset,
        **common,
        **{
            "train.max_steps": 1,
            "optim.embedding.semantics": then,
            "train.warm_start": str(tmp_path / "source" / "checkpoints"),
        },
    )
    run_ctrscale(train_args(tmp_path / "target", target))

    before = checkpoint_tensors(tmp_path / "source", tmp_path)["embedding_optim"]["rows"]
    after = checkpoint_tensors(tmp_path / "target", tmp_path)["embedding_optim"]["rows"]
    assert "fused" not in checkpoint_tensors(tmp_path / "source", tmp_path)["embedding_optim"]
    sums = before["C3.sum"]
    assert (sums > 0).any()  # the source trained: its state is not all zeros
    unchanged = (after["C3.sum"] == sums).all(dim=1)
    assert unchanged.float().mean() > 0.5  # rows the one target step did not look up
    assert (after["C3.sum"] >= sums).all()  # the others only grew from the loaded sums
    torch.testing.assert_close(after["C3.sum"][unchanged], sums[unchanged])
