"""Where rows live: a TBE's ids are local to its shards, so row-wise shards of different
tables never share a key, and every id's gradient row lands on its own weight row."""

from types import SimpleNamespace

import torch

from ctrscale.optim.embedding.gradients import GradientRule, flat_elements, per_id_rows
from ctrscale.optim.embedding.layout import fused_tbe

RULE = GradientRule(l2=0.0, clip=False, r=1.0, zeta_for_dim={4: 0.0}, unclipped_tables=frozenset())


def row_wise_tbe():
    """Rank 1 of 2 holding the second halves of tables of 1,000 and 10,000 rows, as TorchRec's
    row-wise sharding lays them out in one TBE."""
    a = SimpleNamespace(
        name="a", feature_names=["fa"], local_rows=500, local_cols=4, embedding_dim=4,
        local_metadata=SimpleNamespace(shard_offsets=[500, 0]),
    )  # fmt: skip
    b = SimpleNamespace(
        name="b", feature_names=["fb"], local_rows=5000, local_cols=4, embedding_dim=4,
        local_metadata=SimpleNamespace(shard_offsets=[5000, 0]),
    )  # fmt: skip
    flat = torch.randn(500 * 4 + 5000 * 4)
    views = [flat[:2000].view(500, 4), flat[2000:].view(5000, 4)]
    emb = SimpleNamespace(
        config=SimpleNamespace(embedding_tables=[a, b]),
        emb_module=SimpleNamespace(split_embedding_weights=lambda: views),
    )
    return fused_tbe(emb, lambda table: False, []), views, flat


def test_local_ids_of_row_wise_shards_of_two_tables_never_collide():
    tbe, views, flat = row_wise_tbe()
    # Global ids a: 500, 507, 500 and b: 9000, 5002, 9000 arrive local: 0, 7, 0 and 4000, 2, 4000.
    local = {"a": torch.tensor([0, 7, 0]), "b": torch.tensor([4000, 2, 4000])}
    indices = torch.cat([local["a"], local["b"]])  # feature-major bags, one id each
    offsets = torch.arange(7)
    rows = torch.cat([views[0][local["a"]], views[1][local["b"]]], dim=1)  # pooled output
    grad = torch.randn(3, 8)
    (part,) = per_id_rows(tbe, indices, offsets, rows, grad, RULE, need_sums=True)
    assert part.lookups.segments.counts.tolist() == [2, 1, 1, 2]  # 4 distinct (table, id)
    elements = flat_elements(part)
    # Each id's row in the flat buffer is its weight row, and its summed gradient is its own.
    assert torch.equal(flat[elements], part.lookups.weight)
    expected = {
        ("a", 0): grad[0, :4] + grad[2, :4],
        ("a", 7): grad[1, :4],
        ("b", 2): grad[1, 4:],
        ("b", 4000): grad[0, 4:] + grad[2, 4:],
    }
    for row, summed in zip(elements[:, 0].tolist(), part.summed, strict=True):
        table = "a" if row < 2000 else "b"
        local_row = row // 4 if table == "a" else (row - 2000) // 4
        torch.testing.assert_close(summed, expected[(table, local_row)])
