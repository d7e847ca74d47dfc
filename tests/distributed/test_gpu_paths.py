"""GPU and multi-rank settings checked without a GPU: which device a rank takes, which
sharding types a backend can run, and the device memory the planner is told."""

from types import SimpleNamespace

import pytest
import torch

from ctrscale.choices import ShardingChoice
from ctrscale.distributed.context import cuda_index
from ctrscale.distributed.sharding import check_sharding_type, topology
from ctrscale.errors import CtrscaleError


def test_a_rank_takes_its_local_gpu_or_the_only_one_it_sees():
    assert cuda_index(local_rank=3, visible=8) == 3
    assert cuda_index(local_rank=3, visible=1) == 0  # CUDA_VISIBLE_DEVICES set per rank
    with pytest.raises(CtrscaleError, match="LOCAL_RANK 2 but only 2 GPUs"):
        cuda_index(local_rank=2, visible=2)


@pytest.mark.parametrize("sharding", [ShardingChoice.ROW_WISE, ShardingChoice.TABLE_ROW_WISE])
def test_row_wise_needs_nccl_whatever_the_device(sharding):
    check_sharding_type(sharding, "nccl")
    with pytest.raises(CtrscaleError, match="reduce-scatter, which gloo lacks"):
        check_sharding_type(sharding, "gloo")  # also GPUs driven by gloo


def test_the_planner_is_told_the_gpus_real_memory(monkeypatch):
    properties = SimpleNamespace(total_memory=24 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    ctx = SimpleNamespace(world_size=2, local_world_size=2, device=torch.device("cuda", 1))
    assert topology(ctx).devices[0].storage.hbm == 24 * 2**30
    cpu = SimpleNamespace(world_size=1, local_world_size=1, device=torch.device("cpu"))
    assert topology(cpu).devices[0].storage.hbm == 0  # CPU tables live in DDR
