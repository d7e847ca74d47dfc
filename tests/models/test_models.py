"""The CTR models: contract (shapes, tables, first-order tables), DeepFM against an independent
loop-based reference, first-order gradients, init, learning a planted rule, and sharding."""

from __future__ import annotations

import itertools

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import get_unwrapped_module

from ctrscale.config import DistributedConfig, ModelConfig
from ctrscale.data.schema import DENSE_FEATURES, SPARSE_FEATURES
from ctrscale.distributed.context import init_distributed
from ctrscale.distributed.sharding import shard_model
from ctrscale.errors import CtrscaleError
from ctrscale.models import build_model

MODEL_NAMES = ["deepfm", "dlrm", "dcnv2", "wide_deep"]
CPU = torch.device("cpu")
NUM_DENSE = len(DENSE_FEATURES)


def small_config(name: str, **overrides) -> ModelConfig:
    return ModelConfig(
        name=name, embedding_dim=8, dnn=[32, 16], dense_arch=[16], dcn_low_rank=4, **overrides
    )


def uniform_sizes(size: int) -> dict[str, int]:
    return dict.fromkeys(SPARSE_FEATURES, size)


def random_bags(batch: int, sizes: dict[str, int], generator: torch.Generator, max_len: int = 3):
    """ids[feature][row]: 0..max_len ids per bag, so the models see empty and multi-id bags."""
    return {
        feature: [
            torch.randint(0, sizes[feature], (int(n),), generator=generator).tolist()
            for n in torch.randint(0, max_len + 1, (batch,), generator=generator)
        ]
        for feature in SPARSE_FEATURES
    }


def to_kjt(bags: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    rows = [bag for feature in SPARSE_FEATURES for bag in bags[feature]]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(SPARSE_FEATURES),
        values=torch.tensor([i for bag in rows for i in bag], dtype=torch.int64),
        lengths=torch.tensor([len(bag) for bag in rows], dtype=torch.int32),
    )


def table_weight(model, name: str) -> torch.Tensor:
    return model.embedding_bag_collection.embedding_bags[name].weight


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_gives_one_finite_logit_per_row(name):
    torch.manual_seed(0)
    sizes = uniform_sizes(30)
    model = build_model(small_config(name), sizes, embedding_device=CPU)
    bags = random_bags(7, sizes, torch.Generator().manual_seed(1))
    logits = model(torch.rand(7, NUM_DENSE), to_kjt(bags))
    assert logits.shape == (7,)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@torch.no_grad()
def deepfm_reference(model, dense: torch.Tensor, bags) -> torch.Tensor:
    """DeepFM written out term by term: scalar first-order lookups, the explicit pairwise sum
    Σ_{i<j} ⟨e_i, e_j⟩, and the DNN as a chain of affine maps, in float64."""
    weights = {n: p.double() for n, p in model.embedding_bag_collection.named_parameters()}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    dense_linear, dnn_layers = linears[0], linears[1:]
    assert dense_linear.in_features == NUM_DENSE and dnn_layers[-1].out_features == 1
    logits = []
    for row in range(dense.shape[0]):
        fields, first_order = [], 0.0
        for feature in SPARSE_FEATURES:
            table = weights[f"embedding_bags.{feature}.weight"]
            wide_table = weights[f"embedding_bags.{feature}_wide.weight"]
            field = torch.zeros(table.shape[1], dtype=torch.float64)
            for i in bags[feature][row]:
                field += table[i]
                first_order += float(wide_table[i, 0])
            fields.append(field)
        x_dense = dense[row].double()
        linear = float(dense_linear.weight.double()[0] @ x_dense + dense_linear.bias.double()[0])
        fm = sum(
            float(fields[i] @ fields[j]) for i, j in itertools.combinations(range(len(fields)), 2)
        )
        x = torch.cat([*fields, x_dense])
        for k, layer in enumerate(dnn_layers):
            x = layer.weight.double() @ x
            if layer.bias is not None:
                x = x + layer.bias.double()
            if k < len(dnn_layers) - 1:
                x = torch.relu(x)
        logits.append(first_order + linear + fm + float(x[0]))
    return torch.tensor(logits, dtype=torch.float64)


def test_deepfm_matches_independent_reference():
    torch.manual_seed(0)
    sizes = uniform_sizes(40)
    model = build_model(small_config("deepfm"), sizes, embedding_device=CPU)
    # Larger-than-init weights (and non-zero first-order weights) so every term is visible.
    with torch.no_grad():
        for weight in model.embedding_bag_collection.parameters():
            weight.normal_(0.0, 0.3)
    bags = random_bags(6, sizes, torch.Generator().manual_seed(2))
    dense = torch.rand(6, NUM_DENSE)
    logits = model(dense, to_kjt(bags))
    expected = deepfm_reference(model, dense, bags)
    assert expected.abs().min() > 1e-2  # a meaningful relative comparison
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["deepfm", "wide_deep"])
def test_first_order_tables_use_only_column_zero(name):
    torch.manual_seed(0)
    sizes = uniform_sizes(10)
    model = build_model(small_config(name), sizes, embedding_device=CPU)
    assert model.first_order_tables == frozenset(f"{f}_wide" for f in SPARSE_FEATURES)
    bags = random_bags(16, sizes, torch.Generator().manual_seed(3))
    model(torch.rand(16, NUM_DENSE), to_kjt(bags)).square().sum().backward()
    for table in model.first_order_tables:
        grad = table_weight(model, table).grad
        assert torch.count_nonzero(grad[:, 1:]) == 0, table
        assert torch.count_nonzero(grad[:, 0]) > 0, table


@pytest.mark.parametrize("name", ["dlrm", "dcnv2"])
def test_dlrm_models_have_no_first_order_tables(name):
    model = build_model(small_config(name), uniform_sizes(10))
    assert model.first_order_tables == frozenset()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tables_follow_config_and_table_sizes(name):
    sizes = {feature: 100 + i for i, feature in enumerate(SPARSE_FEATURES)}
    config = ModelConfig(name=name, embedding_dim=12)
    model = build_model(config, sizes)
    tables = {t.name: t for t in model.embedding_bag_collection.embedding_bag_configs()}
    expected_names = set(SPARSE_FEATURES) | set(model.first_order_tables)
    assert set(tables) == expected_names
    for feature in SPARSE_FEATURES:
        assert tables[feature].num_embeddings == sizes[feature]
        assert tables[feature].embedding_dim == 12
        assert tables[feature].feature_names == [feature]
    for wide in model.first_order_tables:
        feature = wide.removesuffix("_wide")
        assert (tables[wide].num_embeddings, tables[wide].embedding_dim) == (sizes[feature], 4)
        assert tables[wide].feature_names == [feature]
    # Created on meta: DistributedModelParallel materialises and initialises the tables.
    assert all(p.is_meta for p in model.embedding_bag_collection.parameters())
    assert not any(p.is_meta for n, p in model.named_parameters() if "embedding_bags" not in n)


def test_init_is_normal_with_config_std_and_first_order_starts_at_zero():
    torch.manual_seed(0)
    sizes = uniform_sizes(4) | {"C3": 200_000}
    model = build_model(small_config("deepfm", init_std=0.02), sizes, embedding_device=CPU)
    big = table_weight(model, "C3").detach()
    assert big.std().item() == pytest.approx(0.02, rel=0.01)
    assert big.mean().abs().item() < 1e-4  # standard error of the mean here: 1.6e-5
    assert torch.count_nonzero(table_weight(model, "C3_wide")) == 0


def test_missing_table_size_is_a_clear_error():
    sizes = uniform_sizes(10)
    del sizes["C7"]
    with pytest.raises(CtrscaleError, match=r"C7"):
        build_model(ModelConfig(), sizes)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_learns_a_planted_rule(name):
    """Click iff C26's id is in the lower half of its table (the last key, so a mix-up of
    pooled outputs would show): every model must fit 256 rows within 50 Adam steps."""
    torch.manual_seed(0)
    sizes = uniform_sizes(8)
    model = build_model(small_config(name), sizes, embedding_device=CPU)
    bags = random_bags(256, sizes, torch.Generator().manual_seed(4), max_len=1)
    bags["C26"] = [[row % 8] for row in range(256)]
    labels = torch.tensor([float(bag[0] < 4) for bag in bags["C26"]])
    kjt, dense = to_kjt(bags), torch.rand(256, NUM_DENSE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(dense, kjt), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_embedding_bag_collection_shards_with_fused_optimizer(name, single_process_group):
    torch.manual_seed(0)
    sizes = uniform_sizes(50)
    model = build_model(small_config(name), sizes)
    tables = model.embedding_bag_collection.embedding_bag_configs()
    sharded = shard_model(
        model,
        model.embedding_bag_collection,
        init_distributed(DistributedConfig(device="cpu")),
        sharding_type="table_wise",
        fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1},
        local_batch_size=8,
    )
    # The trainer finds the sharded EBC through the same property.
    assert isinstance(
        get_unwrapped_module(sharded).embedding_bag_collection, ShardedEmbeddingBagCollection
    )

    def local_table(table: str) -> torch.Tensor:
        key = next(k for k in sharded.state_dict() if k.endswith(f"embedding_bags.{table}.weight"))
        return sharded.state_dict()[key].local_shards()[0].tensor

    before = {t.name: local_table(t.name).clone() for t in tables}
    # DMP materialised the meta tables and ran each table's init_fn.
    assert before["C1"].std().item() == pytest.approx(ModelConfig().init_std, rel=0.2)
    bags = random_bags(8, sizes, torch.Generator().manual_seed(5))
    logits = sharded(torch.rand(8, NUM_DENSE), to_kjt(bags))
    assert logits.shape == (8,) and torch.isfinite(logits).all()
    logits.sum().backward()

    moved = [t.name for t in tables if not torch.equal(local_table(t.name), before[t.name])]
    assert set(moved) == {t.name for t in tables}  # the fused SGD updated every table
    for table in model.first_order_tables:
        assert torch.count_nonzero(before[table]) == 0
        assert torch.count_nonzero(local_table(table)[:, 1:]) == 0, table
    dense_grads = [p.grad for n, p in sharded.named_parameters() if "embedding_bags" not in n]
    assert dense_grads and all(g is not None for g in dense_grads)


def test_the_dnn_can_normalise_over_ghost_batches():
    from ctrscale.models.ghost_norm import GhostBatchNorm1d

    config = ModelConfig(name="deepfm", dnn=[16, 8], batch_norm=True, ghost_batch_size=32)
    model = build_model(config, uniform_sizes(10), embedding_device=torch.device("cpu"))
    norms = [m for m in model.dnn.modules() if isinstance(m, GhostBatchNorm1d)]
    assert [n.num_features for n in norms] == [16, 8] and {n.ghost_size for n in norms} == {32}
    plain = build_model(ModelConfig(dnn=[16, 8]), uniform_sizes(10))
    assert not any(isinstance(m, GhostBatchNorm1d) for m in plain.modules())


@pytest.mark.parametrize("batch_norm", [False, True])
def test_the_dnn_rectifies_in_place_with_the_gradients_of_a_plain_relu(batch_norm):
    from ctrscale.models.common import deep_tower

    torch.manual_seed(0)
    tower = deep_tower(12, [16, 8], CPU, batch_norm=batch_norm, ghost_batch_size=4)
    reference = deep_tower(12, [16, 8], CPU, batch_norm=batch_norm, ghost_batch_size=4)
    reference.load_state_dict(tower.state_dict())
    for index, layer in enumerate(reference):
        if isinstance(layer, nn.ReLU):
            reference[index] = nn.ReLU(inplace=False)
    shared_storage = []
    for layer in tower:
        if isinstance(layer, nn.ReLU):
            layer.register_forward_hook(
                lambda _, inputs, output: shared_storage.append(
                    inputs[0].data_ptr() == output.data_ptr()
                )
            )
    x = torch.randn(10, 12)
    outputs = [model(x).square().sum() for model in (tower, reference)]
    for output in outputs:
        output.backward()
    assert shared_storage == [True, True]
    assert torch.equal(outputs[0], outputs[1])
    for (name, a), b in zip(tower.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
