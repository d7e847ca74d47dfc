"""What every CTR model shares: the model interface, the embedding tables (one
`EmbeddingBagCollection`), the field lookup that turns its pooled output into per-field tensors,
and the DeepCTR-style dense towers used by DeepFM and Wide&Deep.

The first-order ("wide") weight of an id is a scalar in the papers. FBGEMM's kernels need
embedding dims that are multiples of 4, so each field's first-order weights live in a dim-4
table `f"{feature}_wide"` of which only column 0 is read in the forward. Columns 1..3 then get
zero gradient, so every element-wise optimizer (SGD, Adagrad, Adam) updates column 0 exactly as
the scalar weight. The one deviation: row-wise Adagrad keeps one accumulator per row, the mean
of g² over the row's 4 columns, so it sees g²/4 and steps column 0 twice as far as it would for
a true scalar row.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_modules import get_embedding_names_by_table

from ctrscale.config import ModelConfig
from ctrscale.data.schema import validate_table_sizes
from ctrscale.models.ghost_norm import GhostBatchNorm1d

WIDE_SUFFIX = "_wide"
# The smallest embedding dim FBGEMM's kernels accept; only column 0 carries the weight.
FIRST_ORDER_DIM = 4
META = torch.device("meta")


class CTRModel(nn.Module):
    """`forward(dense [B, num_dense] float32, sparse KJT) -> logits [B]` over one EBC.

    `first_order_tables` names the wide tables (scalar weight per id) that CowClip must not
    clip: the CowClip code skips its `linear` embeddings, clipping only the field embeddings.
    """

    first_order_tables: frozenset[str] = frozenset()

    @property
    def embedding_bag_collection(self) -> EmbeddingBagCollection:
        raise NotImplementedError

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor):
        raise NotImplementedError


def embedding_tables(
    config: ModelConfig,
    table_sizes: Mapping[str, int],
    features: Sequence[str],
    *,
    first_order: bool,
) -> list[EmbeddingBagConfig]:
    """One `embedding_dim` table per feature named after it, plus (if `first_order`) one dim-4
    `_wide` table per feature.

    Field embeddings start at Normal(0, init_std) (CowClip paper: init std 1e-2); first-order
    weights start at zero, as DeepCTR's `get_linear_logit` (which the CowClip code uses) does.
    """
    validate_table_sizes(table_sizes, "model")
    tables = [
        EmbeddingBagConfig(
            name=name,
            feature_names=[name],
            num_embeddings=int(table_sizes[name]),
            embedding_dim=config.embedding_dim,
            init_fn=functools.partial(nn.init.normal_, mean=0.0, std=config.init_std),
        )
        for name in features
    ]
    if first_order:
        tables += [
            EmbeddingBagConfig(
                name=name + WIDE_SUFFIX,
                feature_names=[name],
                num_embeddings=int(table_sizes[name]),
                embedding_dim=FIRST_ORDER_DIM,
                init_fn=nn.init.zeros_,
            )
            for name in features
        ]
    return tables


class FieldLookups(NamedTuple):
    embeddings: torch.Tensor  # [B, F, D] pooled (summed) field embeddings
    first_order: torch.Tensor  # [B] Σ over fields of the pooled first-order weights


class SparseArch(nn.Module):
    """The one EBC of a model with first-order tables, and the regrouping of its pooled output
    into field embeddings and the summed first-order weights.

    Pooled outputs are addressed by key, never by position, because a sharded EBC may return
    its keys in another order; a feature read by two tables (`C1` and `C1_wide`) gets the key
    `"C1@C1"` / `"C1@C1_wide"`, which `get_embedding_names_by_table` computes for us.
    """

    def __init__(self, tables: list[EmbeddingBagConfig], device: torch.device) -> None:
        super().__init__()
        self.embedding_bag_collection = EmbeddingBagCollection(tables=tables, device=device)
        self._field_keys: list[str] = []
        self._first_order_keys: list[str] = []
        for table, keys in zip(tables, get_embedding_names_by_table(tables), strict=True):
            wide = table.name.endswith(WIDE_SUFFIX)
            (self._first_order_keys if wide else self._field_keys).extend(keys)
        self._embedding_dim = tables[0].embedding_dim

    def forward(self, features: KeyedJaggedTensor) -> FieldLookups:
        pooled: KeyedTensor = self.embedding_bag_collection(features)
        fields, wide = self._split(pooled)
        # Column 0 of each dim-4 row is the scalar weight; columns 1..3 stay out of the graph.
        first_order = wide.view(-1, len(self._first_order_keys), FIRST_ORDER_DIM)[:, :, 0]
        return FieldLookups(
            fields.view(-1, len(self._field_keys), self._embedding_dim), first_order.sum(dim=1)
        )

    def _split(self, pooled: KeyedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Field embeddings and first-order weights as two [B, ·] blocks.

        When the pooled output already lists the field keys, then the first-order keys, in
        order (what the EBC returns, sharded or not, in practice), the blocks are two views of
        it; otherwise a regroup copies them into place. Splitting into 52 views and
        concatenating them back costs two copies of the output, forward and backward. (A
        `split`, not two slices: its backward writes both gradients into one new tensor, where
        each slice's backward allocates and adds a full-width one.)
        """
        keys = pooled.keys()
        if keys == [*self._field_keys, *self._first_order_keys]:
            width = len(self._field_keys) * self._embedding_dim
            values = pooled.values()
            fields, wide = values.split([width, values.shape[1] - width], dim=1)
            return fields, wide
        fields, wide = KeyedTensor.regroup([pooled], [self._field_keys, self._first_order_keys])
        return fields, wide


def keras_glorot_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Keras' `glorot_normal`, which DeepCTR (and so the CowClip code) uses for every dense
    kernel: a normal truncated at ±2σ whose σ is rescaled so the result has Glorot's variance
    2 / (fan_in + fan_out)."""
    fan_out, fan_in = weight.shape
    std = math.sqrt(2.0 / (fan_in + fan_out)) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _init_like_deepctr(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            keras_glorot_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def deep_tower(
    in_features: int,
    hidden: Sequence[int],
    device: torch.device,
    batch_norm: bool = False,
    ghost_batch_size: int | None = None,
) -> nn.Sequential:
    """DeepCTR's DNN (ReLU after every hidden layer; with `batch_norm`, ghost batch norm
    before each ReLU) and its bias-free `Dense(1)` logit.

    The ReLUs rectify in place: neither a linear layer's nor batch norm's backward reads its
    own output, so the pre-activation need not be kept, and each hidden layer's forward writes
    one [B, width] tensor instead of two (at 128K rows × 400, 200 MiB less per layer)."""
    layers: list[nn.Module] = []
    width = in_features
    for out in hidden:
        layers.append(nn.Linear(width, out, bias=True, device=device))
        if batch_norm:
            layers.append(GhostBatchNorm1d(out, ghost_batch_size, device=device))
        layers.append(nn.ReLU(inplace=True))
        width = out
    tower = nn.Sequential(*layers, nn.Linear(width, 1, bias=False, device=device))
    _init_like_deepctr(tower)
    return tower


def dense_linear(num_dense: int, device: torch.device) -> nn.Linear:
    """The first-order term of the dense features; its bias is the model's global bias
    (DeepCTR's `PredictionLayer` bias, zero-initialised)."""
    linear = nn.Linear(num_dense, 1, bias=True, device=device)
    _init_like_deepctr(linear)
    return linear
