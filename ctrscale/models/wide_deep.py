"""Wide&Deep (Cheng et al. 2016) as DeepCTR's `WDL` builds it (one of the CowClip paper's
models): a wide linear model over the ids and dense features plus a DNN over the embeddings.

logit = b + Σ_f w_f[x_f] + ⟨v, dense⟩     wide (`_wide` tables + linear on dense)
      + DNN([e_1, …, e_F, dense])          deep (ReLU hidden layers `config.dnn` → 1)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from ctrscale.config import ModelConfig
from ctrscale.data.schema import SPARSE_FEATURES
from ctrscale.models.common import (
    WIDE_SUFFIX,
    CTRModel,
    SparseArch,
    deep_tower,
    dense_linear,
    embedding_tables,
)


class WideDeep(CTRModel):
    def __init__(
        self,
        config: ModelConfig,
        table_sizes: Mapping[str, int],
        *,
        num_dense: int,
        dense_device: torch.device,
        embedding_device: torch.device,
    ) -> None:
        super().__init__()
        tables = embedding_tables(config, table_sizes, SPARSE_FEATURES, first_order=True)
        self.first_order_tables = frozenset(t.name for t in tables if t.name.endswith(WIDE_SUFFIX))
        self.sparse_arch = SparseArch(tables, embedding_device)
        self.dense_linear = dense_linear(num_dense, dense_device)
        self.dnn = deep_tower(
            len(SPARSE_FEATURES) * config.embedding_dim + num_dense,
            config.dnn,
            dense_device,
            batch_norm=config.batch_norm,
            ghost_batch_size=config.ghost_batch_size,
        )

    @property
    def embedding_bag_collection(self) -> EmbeddingBagCollection:
        return self.sparse_arch.embedding_bag_collection

    def wide_and_deep_logit(
        self, fields: torch.Tensor, first_order: torch.Tensor, dense_features: torch.Tensor
    ) -> torch.Tensor:
        wide = first_order + self.dense_linear(dense_features).squeeze(1)
        deep = self.dnn(torch.cat([fields.flatten(1), dense_features], dim=1)).squeeze(1)
        return wide + deep

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor:
        fields, first_order = self.sparse_arch(sparse_features)
        return self.wide_and_deep_logit(fields, first_order, dense_features)
