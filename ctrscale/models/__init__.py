"""CTR models over one TorchRec `EmbeddingBagCollection`: DeepFM (default), DLRM, DCNv2 and
Wide&Deep, built by `build_model` from `ModelConfig` and the dataset's table sizes.

Every model is a `CTRModel`: `forward(dense [B, num_dense], sparse KJT of C1..C26) -> logits
[B]`, its EBC at `model.embedding_bag_collection` (created on the meta device for
DistributedModelParallel to materialise, shard and initialise with each table's `init_fn`),
and `model.first_order_tables`, the wide tables CowClip must not clip.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ctrscale.config import ModelConfig
from ctrscale.models.common import META, CTRModel
from ctrscale.models.deepfm import DeepFM
from ctrscale.models.dlrm import TorchRecDLRM
from ctrscale.models.wide_deep import WideDeep

__all__ = ["CTRModel", "build_model"]

CPU = torch.device("cpu")


def build_model(
    config: ModelConfig,
    table_sizes: Mapping[str, int],
    *,
    num_dense: int = 13,
    dense_device: torch.device = CPU,
    embedding_device: torch.device = META,
) -> CTRModel:
    """The model `config.name` names. Dense layers are created (and initialised) on
    `dense_device`; the EBC on `embedding_device` — meta for DistributedModelParallel, or a real
    device to get tables initialised by their `init_fn` and run unsharded (tests)."""
    devices = dict(
        num_dense=num_dense, dense_device=dense_device, embedding_device=embedding_device
    )
    if config.name == "deepfm":
        return DeepFM(config, table_sizes, **devices)
    if config.name == "wide_deep":
        return WideDeep(config, table_sizes, **devices)
    return TorchRecDLRM(config, table_sizes, **devices, cross_net=config.name == "dcnv2")
