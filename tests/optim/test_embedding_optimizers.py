"""Each embedding optimizer's row form against its formula: the rows given change, every
other row and its state stay, and a flat buffer of several tables (a TBE) addressed by
element indices updates exactly like the tables on their own."""

from __future__ import annotations

import pytest
import torch

from ctrscale.choices import EmbeddingOptimizerName
from ctrscale.config import EmbeddingOptimConfig
from ctrscale.optim.embedding.optimizers import OPTIMIZERS, build_embedding_optimizer

W0, G1, G2 = [3.0, 4.0], [0.6, 0.8], [0.0, 2.0]


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def optimizer(name: str, lr: float = 0.1, **settings):
    config = EmbeddingOptimConfig(name=name, lr=lr, **settings)
    return build_embedding_optimizer(config)


def step(opt, weight, state, rows, grad) -> None:
    opt.begin_step()
    opt.apply(weight, state, rows, grad)


def test_rowwise_novograd_rows_follow_the_papers_oracle_each_with_its_own_moment():
    """Row 0 follows the notes' NovoGrad oracle; row 1, with gradients 100× larger, takes the
    same normalised step as if it were alone (one moment per table would shrink row 0's)."""
    opt = optimizer("rowwise_novograd", eps=1e-8)
    weight = tensor([W0, [1.0, 1.0], [5.0, -5.0]])
    state = opt.new_state(weight)
    rows = torch.tensor([0, 1])
    step(opt, weight, state, rows, tensor([G1, [60.0, 80.0]]))
    assert weight[0].tolist() == pytest.approx([2.94, 3.92], abs=1e-6)
    assert weight[1].tolist() == pytest.approx([0.94, 0.92], abs=1e-6)
    step(opt, weight, state, rows, tensor([G2, [0.0, 200.0]]))
    assert weight[0].tolist() == pytest.approx([2.883, 3.649743], abs=1e-6)
    assert state["exp_avg_sq"][:2, 0].tolist() == pytest.approx([1.06, 1.06e4], rel=1e-6)


def test_rowwise_novograd_absent_rows_stay_and_start_fresh_later():
    opt = optimizer("rowwise_novograd")
    weight = tensor([W0, [1.0, 1.0], [5.0, -5.0]])
    state = opt.new_state(weight)
    step(opt, weight, state, torch.tensor([0]), tensor([G1]))
    assert weight[1:].tolist() == [[1.0, 1.0], [5.0, -5.0]]
    assert state["exp_avg"][1:].abs().sum() == 0 and state["exp_avg_sq"][1:].abs().sum() == 0
    # Row 2's first update, at the second step, is a first step: v = ‖g‖², m = g/‖g‖.
    step(opt, weight, state, torch.tensor([2]), tensor([[3.0, 4.0]]))
    assert state["exp_avg_sq"][2].tolist() == pytest.approx([25.0, 25.0], rel=1e-6)
    assert weight[2].tolist() == pytest.approx([4.94, -5.08], abs=1e-6)


def test_adam_row_form_is_kingma_and_ba_with_the_runs_step_count():
    opt = optimizer("adam", lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    weight = tensor([W0, [1.0, 1.0]])
    state = opt.new_state(weight)
    step(opt, weight, state, torch.tensor([1]), tensor([G1]))  # t = 1, row 1
    step(opt, weight, state, torch.tensor([0]), tensor([G1]))  # t = 2, row 0's first update
    m = 0.1 * torch.tensor(G1, dtype=torch.float64)
    v = 0.001 * torch.tensor(G1, dtype=torch.float64) ** 2
    expected = torch.tensor(W0) - 0.01 * (m / (1 - 0.9**2)) / ((v / (1 - 0.999**2)).sqrt() + 1e-8)
    assert weight[0].tolist() == pytest.approx(expected.tolist(), rel=1e-12)


@pytest.mark.parametrize("name", list(EmbeddingOptimizerName))
def test_a_flat_buffer_updates_like_its_tables_on_their_own(name):
    """A TBE keeps tables of different widths in one flat buffer: rows are element indices."""
    generator = torch.Generator().manual_seed(1)
    narrow = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    wide = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    flat = torch.cat([narrow.flatten(), wide.flatten()])
    separate, together = optimizer(name), optimizer(name)
    states = {"narrow": separate.new_state(narrow), "wide": separate.new_state(wide)}
    flat_state = together.new_state(flat)
    for number in range(3):
        g_narrow = torch.randn(2, 2, generator=generator, dtype=torch.float64)
        g_wide = torch.randn(1, 4, generator=generator, dtype=torch.float64)
        narrow_rows, wide_rows = torch.tensor([number % 3, 2]), torch.tensor([number % 2])
        separate.begin_step()
        together.begin_step()
        separate.apply(narrow, states["narrow"], narrow_rows, g_narrow)
        separate.apply(wide, states["wide"], wide_rows, g_wide)
        for rows, g, start, width in ((narrow_rows, g_narrow, 0, 2), (wide_rows, g_wide, 6, 4)):
            elements = (start + rows * width).unsqueeze(1) + torch.arange(width)
            together.apply(flat, flat_state, elements, g)
    torch.testing.assert_close(flat, torch.cat([narrow.flatten(), wide.flatten()]))


@pytest.mark.parametrize("name", list(EmbeddingOptimizerName))
def test_every_row_at_once_equals_all_rows_listed(name):
    """Dense semantics passes rows=None: the same update as listing every row."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    listed, whole = weight.clone(), weight.clone()
    first, second = optimizer(name), optimizer(name)
    listed_state, whole_state = first.new_state(listed), second.new_state(whole)
    for _ in range(3):
        grad = torch.randn(4, 3, generator=generator, dtype=torch.float64)
        step(first, listed, listed_state, torch.arange(4), grad)
        step(second, whole, whole_state, None, grad)
    torch.testing.assert_close(whole, listed)


def test_every_configured_name_has_one_class():
    assert set(OPTIMIZERS) == set(EmbeddingOptimizerName)


class FbgemmIterCounter(torch.nn.Module):
    """FBGEMM 1.8's step counter as its TBE forward keeps it (read in
    split_table_batched_embeddings_ops_training.py; its CPU TBE has no Adam to run): `iter_cpu`
    is synced from the `iter` buffer while 0, then both advance on every forward, evaluation
    included. `t` is what the fused kernel's bias correction would use."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("iter", torch.zeros(1, dtype=torch.int64))
        self.iter_cpu = torch.zeros(1, dtype=torch.int64)
        self.t: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.iter_cpu.item() == 0:
            self.iter_cpu.fill_(self.iter.item())
        self.t.append(int(self.iter_cpu.add_(1).item()))
        self.iter.add_(1)
        return x


def test_the_fused_adam_kernel_counts_the_steps_the_row_form_counts():
    """Evaluation forwards and a restart (a fresh TBE, `steps` from a checkpoint) must not
    change the t of FBGEMM's bias correction: it stays the row form's, steps + 1."""
    adam = build_embedding_optimizer(EmbeddingOptimConfig(name="adam"))
    tbe = FbgemmIterCounter()
    adam.keep_fused_step_count(tbe)
    x = torch.ones(1, requires_grad=True)
    for _ in range(2):
        tbe(x)
        adam.begin_step()
    with torch.no_grad():
        tbe.eval()(x)  # evaluation: FBGEMM advances its counter
    tbe.train()(x)
    adam.begin_step()
    assert tbe.t[:2] + tbe.t[3:] == [1, 2, 3] == [1, 2, int(adam.steps)]

    restarted = FbgemmIterCounter()  # a resumed run: new TBE, `steps` loaded in place
    adam.keep_fused_step_count(restarted)
    restarted(x)
    assert restarted.t == [4]
