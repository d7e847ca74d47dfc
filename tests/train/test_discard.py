"""Discarding small-loss samples drops exactly ⌊q·B⌋ rows, the smallest losses, ties broken by
position, so every world size drops the same rows."""

import pytest
import torch

from ctrscale.train.discard import kept_rows, local_kept_rows


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.99])
def test_exactly_floor_q_b_rows_are_dropped_and_they_are_the_smallest(fraction):
    losses = torch.rand(103, generator=torch.Generator().manual_seed(0))
    kept = kept_rows(losses, fraction)
    dropped = int(fraction * 103)
    assert (~kept).sum().item() == dropped
    if 0 < dropped < 103:
        assert losses[~kept].max() <= losses[kept].min()


def test_ties_drop_the_earlier_rows_first():
    losses = torch.tensor([0.5, 0.2, 0.2, 0.2, 0.9])
    assert kept_rows(losses, 0.4).tolist() == [True, False, False, True, True]


def test_a_rank_keeps_its_slice_of_the_global_choice():
    losses = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2, 0.8])
    expected = kept_rows(losses, 0.5)
    assert local_kept_rows(losses, 0.5, rank=0, world_size=1).tolist() == expected.tolist()
