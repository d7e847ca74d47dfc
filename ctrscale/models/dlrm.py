"""DLRM (Naumov et al. 2019) and DCNv2 (Wang et al. 2021) as TorchRec builds them
(`torchrec.models.dlrm.DLRM` / `DLRM_DCN`, the models of the torchrec_dlrm Criteo example).

DLRM:  z = bottom_MLP(dense) ∈ R^D;  logit = top_MLP([z, ⟨z, e_i⟩, ⟨e_i, e_j⟩ for i<j])
DCNv2: x_0 = [z, e_1, …, e_F];  x_{l+1} = x_0 ⊙ (W_l (V_l x_l) + b_l) + x_l  (low-rank cross,
       `dcn_num_layers` layers of rank `dcn_low_rank`);  logit = top_MLP(x_L)

bottom MLP = `config.dense_arch` + [embedding_dim], top MLP = `config.dnn` + [1]. Neither has
first-order tables, so CowClip may clip every table.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM, DLRM_DCN

from ctrscale.config import ModelConfig
from ctrscale.data.schema import SPARSE_FEATURES
from ctrscale.models.common import CTRModel, embedding_tables


class TorchRecDLRM(CTRModel):
    """Wraps TorchRec's `DLRM` or `DLRM_DCN` so the output is logits [B] instead of [B, 1]."""

    def __init__(
        self,
        config: ModelConfig,
        table_sizes: Mapping[str, int],
        *,
        num_dense: int,
        dense_device: torch.device,
        embedding_device: torch.device,
        cross_net: bool,
    ) -> None:
        super().__init__()
        tables = embedding_tables(config, table_sizes, SPARSE_FEATURES, first_order=False)
        arch = dict(
            embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=embedding_device),
            dense_in_features=num_dense,
            dense_arch_layer_sizes=[*config.dense_arch, config.embedding_dim],
            over_arch_layer_sizes=[*config.dnn, 1],
            dense_device=dense_device,
        )
        self.dlrm = (
            DLRM_DCN(
                **arch, dcn_num_layers=config.dcn_num_layers, dcn_low_rank_dim=config.dcn_low_rank
            )
            if cross_net
            else DLRM(**arch)
        )

    @property
    def embedding_bag_collection(self) -> EmbeddingBagCollection:
        return self.dlrm.sparse_arch.embedding_bag_collection

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor:
        return self.dlrm(dense_features, sparse_features).squeeze(1)
