"""Ghost batch norm normalizes each ghost batch on its own (the notes' oracle), updates the
running statistics once per ghost batch, and is plain batch norm in evaluation."""

import pytest
import torch

from ctrscale.models.ghost_norm import GhostBatchNorm1d


def test_each_ghost_batch_is_normalized_with_its_own_statistics():
    x = torch.tensor([[0.0], [2.0], [10.0], [12.0]])
    ghost = GhostBatchNorm1d(1, ghost_size=2, affine=False, eps=1e-12)
    assert ghost(x).flatten().tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])
    full = GhostBatchNorm1d(1, ghost_size=None, affine=False, eps=1e-12)
    expected = [-1.1767, -0.7845, 0.7845, 1.1767]
    assert full(x).flatten().tolist() == pytest.approx(expected, abs=1e-4)


def test_running_statistics_move_once_per_ghost_batch():
    x = torch.tensor([[0.0], [2.0], [10.0], [12.0]])
    ghost = GhostBatchNorm1d(1, ghost_size=2, affine=False, momentum=0.5)
    ghost(x)
    # Chunk means 1 then 11: 0 → 0.5 → 5.75; unbiased chunk variances 2 and 2: 1 → 1.5 → 1.75.
    assert ghost.running_mean.item() == pytest.approx(5.75)
    assert ghost.running_var.item() == pytest.approx(1.75)
    assert ghost.num_batches_tracked.item() == 2
    ghost.eval()
    assert ghost(x).flatten().tolist() == pytest.approx(
        ((x.flatten() - 5.75) / (1.75 + 1e-5) ** 0.5).tolist(), rel=1e-6
    )


def test_gradients_flow_through_every_ghost_batch():
    x = torch.randn(10, 3, requires_grad=True)
    ghost = GhostBatchNorm1d(3, ghost_size=4)
    ghost(x).square().sum().backward()
    assert x.grad.abs().sum() > 0 and ghost.weight.grad is not None
