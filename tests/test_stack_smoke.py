"""The pinned CPU stack works together: a TorchRec EBC sharded by DistributedModelParallel
(gloo, world size 1) trains with an optimizer fused into the FBGEMM backward."""

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward


def test_sharded_ebc_trains_with_fused_fbgemm_sgd(single_process_group):
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=8, num_embeddings=50, feature_names=[f"f{i}"]
        )
        for i in range(2)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.5})
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"),
        constraints={
            t.name: ParameterConstraints(
                sharding_types=["table_wise"], compute_kernels=[EmbeddingComputeKernel.FUSED.value]
            )
            for t in tables
        },
    )
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(ebc, sharders, single_process_group)
    model = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan, sharders=sharders)

    def table(name):
        return model.state_dict()[f"embedding_bags.{name}.weight"].local_shards()[0].tensor

    before = {t.name: table(t.name).clone() for t in tables}
    ids = torch.tensor([3, 7, 7, 11])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=ids, lengths=torch.ones(4, dtype=torch.int32)
    )
    pooled = model(kjt).wait()
    assert pooled.values().shape == (2, 16)
    pooled.values().sum().backward()

    # FBGEMM's fused SGD with loss = sum of outputs: every looked-up row moves by -lr per
    # lookup, all other rows stay, and no dense .grad is ever materialised for the table.
    after = {t.name: table(t.name) for t in tables}
    torch.testing.assert_close(after["t0"][3], before["t0"][3] - 0.5)
    torch.testing.assert_close(after["t0"][7], before["t0"][7] - 0.5)
    torch.testing.assert_close(after["t1"][7], before["t1"][7] - 0.5)
    torch.testing.assert_close(after["t1"][11], before["t1"][11] - 0.5)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[[3, 7]] = False
    torch.testing.assert_close(after["t0"][untouched], before["t0"][untouched])
    assert all(p.grad is None for p in model.parameters())
