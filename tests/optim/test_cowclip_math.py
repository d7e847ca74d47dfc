"""CowClip math against a literal, loop-per-id reference built from autograd on a dense model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from ctrscale.optim.cowclip import (
    IdSegments,
    cowclip_scale,
    cowclip_threshold,
    segment_ids,
    segment_sums,
    zeta_from_official_bound,
)

VOCAB, DIM, BATCH = 9, 4, 96

# Conveniences over the production functions, used as the specification below.


def clip_rows(
    grad_rows: Tensor, weight_rows: Tensor, counts: Tensor, r: float, zeta: float
) -> Tensor:
    """CowClip applied to full rows: `g · min(1, cnt·max(r‖w‖, ζ)/‖g‖)` for rows of shape [n, d]."""
    scale = cowclip_scale(
        grad_rows.square().sum(dim=1), weight_rows.square().sum(dim=1), counts, r, zeta
    )
    return grad_rows * scale.unsqueeze(1)


def factors_from_sq_norms(
    segments: IdSegments, grad_sq_norm: Tensor, weight_sq_norm: Tensor, r: float, zeta: float
) -> Tensor:
    """Each sample's clip factor (shape [B]): its id's `cowclip_scale`, gathered back per sample."""
    per_id = cowclip_scale(grad_sq_norm, weight_sq_norm, segments.counts, r, zeta)
    return per_id[segments.inverse]


def per_sample_scale(
    ids: Tensor, grad_out_rows: Tensor, weight_rows: Tensor, r: float, zeta: float
) -> Tensor:
    """Clip factor of every sample of one single-valued feature, for scaling output gradients.

    Scaling sample i's output-gradient row by the factor of its id and letting the embedding
    backward sum rows per id yields exactly the CowClip-clipped gradient row of every id, because
    all samples of an id share one factor: Σ_i f·g_i = f·Σ_i g_i. This does not hold for pooled
    multi-valued bags (one pooled row would need a different factor per id), so it is for
    single-valued features only.
    """
    segments = segment_ids(ids)
    grad_sq_norm, weight_sq_norm = sq_norms(segments, grad_out_rows, weight_rows)
    return factors_from_sq_norms(segments, grad_sq_norm, weight_sq_norm, r, zeta)


def sq_norms(segments: IdSegments, grad_out_rows: Tensor, weight_rows: Tensor):
    """Per-id (‖Σ_samples g‖², ‖w‖²) from per-sample rows, as the production hook forms them."""
    grad_sq = segment_sums(segments, grad_out_rows).square().sum(1)
    return grad_sq, weight_rows[segments.representative].square().sum(1)


def reference_clipped_gradient(
    weight_grad: torch.Tensor, weight: torch.Tensor, bags: list[list[int]], r: float, zeta: float
) -> torch.Tensor:
    """Algorithm 1 of the CowClip paper, literally: one id at a time over the dense gradient."""
    clipped = weight_grad.clone()
    for row in sorted({i for bag in bags for i in bag}):
        cnt = sum(1 for bag in bags if row in bag)
        g = weight_grad[row]
        threshold = cnt * max(r * weight[row].norm().item(), zeta)
        g_norm = g.norm().item()
        if g_norm > 0:
            clipped[row] = g * min(1.0, threshold / g_norm)
    return clipped


def official_clip(grad_rows, weight_rows, counts, ratio, min_w):
    """LargeBatchCTR clip.py `clip_id_norm` (dense branch) transcribed to torch."""
    clipnorm = weight_rows.norm(dim=-1).clamp_min(min_w) * counts.to(weight_rows.dtype)
    clip_t = ratio * clipnorm
    l2sum_row = (grad_rows * grad_rows).sum(dim=-1)
    l2norm_row = torch.where(l2sum_row > 0, l2sum_row, torch.ones_like(l2sum_row)).sqrt()
    return grad_rows * clip_t.unsqueeze(-1) / torch.maximum(l2norm_row, clip_t).unsqueeze(-1)


class TinyCtr(nn.Module):
    """One single-valued embedding table feeding a small nonlinear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM, dtype=torch.float64)
        self.head = nn.Sequential(
            nn.Linear(DIM, 8, dtype=torch.float64), nn.Tanh(), nn.Linear(8, 1, dtype=torch.float64)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids)).squeeze(1)


def skewed_ids(generator: torch.Generator, size: int) -> torch.Tensor:
    """Heavy repeats: id k drawn with probability ∝ 2^-k, so a few ids dominate the batch."""
    probs = torch.tensor([2.0**-k for k in range(VOCAB)])
    return torch.multinomial(probs, size, replacement=True, generator=generator)


def make_model(seed: int, init_std: float, zero_rows: tuple[int, ...] = ()) -> TinyCtr:
    torch.manual_seed(seed)
    model = TinyCtr()
    with torch.no_grad():
        model.embedding.weight.normal_(0.0, init_std)
        model.embedding.weight[list(zero_rows)] = 0.0
    return model


def mean_loss(logits, labels, sample_weight):
    per_sample = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (per_sample * sample_weight).mean()


def batch(seed: int, silenced_id: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    ids = skewed_ids(generator, BATCH)
    labels = torch.randint(0, 2, (BATCH,), generator=generator).to(torch.float64)
    # Samples of `silenced_id` contribute nothing to the loss: that id has cnt > 0 but g = 0.
    sample_weight = torch.ones(BATCH, dtype=torch.float64)
    if silenced_id is not None:
        sample_weight[ids == silenced_id] = 0.0
    return ids, labels, sample_weight


CASES = [
    # (r, zeta, init_std, zero_rows, silenced_id); init_std is small so that at this batch size
    # every case has clipped and unclipped ids.
    (1.0, 0.0, 1e-4, (), None),
    (1.0, zeta_from_official_bound(1.0, DIM, 1e-5), 1e-4, (), None),
    (0.1, 1e-4, 1e-4, (), 0),
    (0.1, 0.0, 1e-3, (1,), 2),
    (10.0, 0.0, 1e-5, (), 1),
    (1.0, 1e-4, 1e-4, (0, 3), None),  # zero weights: the ζ floor sets the threshold
    (1.0, 0.0, 1e-4, (0, 3), None),  # zero weights and no floor: their gradients become 0
]


@pytest.mark.parametrize(("r", "zeta", "init_std", "zero_rows", "silenced_id"), CASES)
def test_clip_rows_matches_the_per_id_reference(r, zeta, init_std, zero_rows, silenced_id):
    model = make_model(seed=3, init_std=init_std, zero_rows=zero_rows)
    ids, labels, sample_weight = batch(seed=4, silenced_id=silenced_id)
    mean_loss(model(ids), labels, sample_weight).backward()
    weight, weight_grad = model.embedding.weight.detach(), model.embedding.weight.grad
    expected = reference_clipped_gradient(weight_grad, weight, [[i] for i in ids.tolist()], r, zeta)

    segments = segment_ids(ids)
    rows = segments.unique_ids
    clipped = clip_rows(weight_grad[rows], weight[rows], segments.counts, r, zeta)

    torch.testing.assert_close(clipped, expected[rows], rtol=1e-12, atol=0.0)
    row_norms = (clipped.norm(dim=1), weight_grad[rows].norm(dim=1))
    assert (row_norms[0] < row_norms[1]).any(), "no id was clipped: the case tests nothing"
    assert (row_norms[0] == row_norms[1]).any(), "every id was clipped"
    if silenced_id is not None:
        assert weight_grad[silenced_id].abs().sum() == 0  # a zero gradient stays exactly zero
        assert clipped[rows == silenced_id].abs().sum() == 0
    if zero_rows and zeta == 0.0:
        assert clipped[torch.isin(rows, torch.tensor(zero_rows))].abs().sum() == 0


@pytest.mark.parametrize("r", [1.0, 3.0, 10.0])
def test_scaling_per_sample_output_gradients_then_summing_per_id_gives_clipped_rows(r):
    """The identity the production hook relies on, for single-valued features."""
    zeta = 1e-4
    model = make_model(seed=7, init_std=1e-4, zero_rows=(2,))
    ids, labels, sample_weight = batch(seed=8)
    looked_up = model.embedding(ids)
    looked_up.retain_grad()
    mean_loss(model.head(looked_up).squeeze(1), labels, sample_weight).backward()
    grad_out = looked_up.grad
    weight, weight_grad = model.embedding.weight.detach(), model.embedding.weight.grad

    factors = per_sample_scale(ids, grad_out, weight[ids], r, zeta)
    summed = torch.zeros_like(weight).index_add_(0, ids, grad_out * factors.unsqueeze(1))

    segments = segment_ids(ids)
    rows = segments.unique_ids
    expected = clip_rows(weight_grad[rows], weight[rows], segments.counts, r, zeta)
    torch.testing.assert_close(summed[rows], expected, rtol=1e-12, atol=1e-18)
    assert (factors < 1).any() and (factors == 1).any()


def test_a_gradient_hook_with_per_sample_scale_trains_on_clipped_gradients():
    r, zeta = 1.0, 1e-4
    ids, labels, sample_weight = batch(seed=9)

    plain = make_model(seed=10, init_std=1e-4)
    mean_loss(plain(ids), labels, sample_weight).backward()
    weight = plain.embedding.weight.detach()
    expected = reference_clipped_gradient(
        plain.embedding.weight.grad, weight, [[i] for i in ids.tolist()], r, zeta
    )

    hooked = make_model(seed=10, init_std=1e-4)
    looked_up = hooked.embedding(ids)
    rows_per_sample = hooked.embedding.weight.detach()[ids]
    looked_up.register_hook(
        lambda grad: grad * per_sample_scale(ids, grad, rows_per_sample, r, zeta).unsqueeze(1)
    )
    mean_loss(hooked.head(looked_up).squeeze(1), labels, sample_weight).backward()
    torch.testing.assert_close(hooked.embedding.weight.grad, expected, rtol=1e-12, atol=1e-18)
    assert not torch.allclose(expected, plain.embedding.weight.grad)  # clipping did something


def test_column_wise_partial_squared_norms_sum_to_the_full_factors():
    generator = torch.Generator().manual_seed(11)
    ids = skewed_ids(generator, BATCH)
    table = torch.randn(VOCAB, 8, generator=generator, dtype=torch.float64) * 1e-3
    grad_out = torch.randn(BATCH, 8, generator=generator, dtype=torch.float64) * 2e-3
    segments = segment_ids(ids)

    shards = [slice(0, 3), slice(3, 8)]  # uneven column split, as table-column-wise sharding
    partial = [sq_norms(segments, grad_out[:, cols], table[ids][:, cols]) for cols in shards]
    grad_sq = sum(p[0] for p in partial)  # what an all-reduce(SUM) over the shards yields
    weight_sq = sum(p[1] for p in partial)

    factors = factors_from_sq_norms(segments, grad_sq, weight_sq, r=1.0, zeta=1e-3)
    torch.testing.assert_close(factors, per_sample_scale(ids, grad_out, table[ids], 1.0, 1e-3))
    assert (factors < 1).any() and (factors == 1).any()


def test_scale_on_hand_computed_values():
    weight_sq = torch.tensor([25.0, 25.0, 0.0, 0.0, 25.0])  # ‖w‖ = 5 or 0
    counts = torch.tensor([2, 2, 3, 3, 1])
    grad_sq = torch.tensor([100.0, 16.0, 1.0, 0.0, 0.0])  # ‖g‖ = 10, 4, 1, 0, 0
    r, zeta = 0.5, 0.1
    # thresholds: 2·max(2.5, .1)=5, 5, 3·max(0, .1)=.3, .3, 1·2.5=2.5
    torch.testing.assert_close(
        cowclip_threshold(weight_sq, counts, r, zeta), torch.tensor([5.0, 5.0, 0.3, 0.3, 2.5])
    )
    torch.testing.assert_close(
        cowclip_scale(grad_sq, weight_sq, counts, r, zeta),
        torch.tensor([0.5, 1.0, 0.3, 1.0, 1.0]),
    )


def test_zero_threshold_and_zero_gradient_gives_factor_one_not_nan():
    scale = cowclip_scale(torch.zeros(3), torch.zeros(3), torch.ones(3), r=1.0, zeta=0.0)
    assert scale.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(("r", "dim", "bound"), [(1.0, 10, 1e-5), (2.0, 12, 1e-4), (0.5, 16, 0.0)])
def test_official_bound_convention_transfers_exactly(r, dim, bound):
    generator = torch.Generator().manual_seed(12)
    n = 64
    grad_rows = torch.randn(n, dim, generator=generator, dtype=torch.float64) * 1e-4
    grad_rows[::7] = 0.0
    weight_rows = torch.randn(n, dim, generator=generator, dtype=torch.float64) * 1e-5
    weight_rows[::5] = 0.0
    counts = torch.randint(1, 50, (n,), generator=generator)

    official = official_clip(grad_rows, weight_rows, counts, r, min_w=r * math.sqrt(dim) * bound)
    ours = clip_rows(grad_rows, weight_rows, counts, r, zeta_from_official_bound(r, dim, bound))
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=1e-20)


def test_paper_setting_zeta_value():
    assert zeta_from_official_bound(1.0, 10, 1e-5) == pytest.approx(math.sqrt(10) * 1e-5)


def test_segments_name_each_id_its_count_and_a_sample_that_holds_it():
    ids = skewed_ids(torch.Generator().manual_seed(12), BATCH)
    segments = segment_ids(ids)
    assert torch.equal(segments.unique_ids[segments.inverse], ids)
    assert torch.equal(ids[segments.representative], segments.unique_ids)
    assert torch.equal(segments.counts, torch.bincount(ids)[segments.unique_ids])


def test_segment_sums_add_each_ids_rows_and_accept_an_empty_batch():
    ids = torch.tensor([5, 2, 5, 9, 2, 5])
    rows = torch.arange(12, dtype=torch.float64).view(6, 2)
    segments = segment_ids(ids)
    assert segments.unique_ids.tolist() == [2, 5, 9]
    expected = [rows[[1, 4]].sum(0), rows[[0, 2, 5]].sum(0), rows[3]]
    torch.testing.assert_close(segment_sums(segments, rows), torch.stack(expected))

    empty = segment_ids(torch.zeros(0, dtype=torch.int64))
    assert segment_sums(empty, torch.zeros(0, 4)).shape == (0, 4)
    assert empty.inverse.numel() == empty.representative.numel() == 0
