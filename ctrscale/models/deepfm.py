"""DeepFM (Guo et al. 2017), the CowClip paper's main model, as DeepCTR builds it.

logit = b + Σ_f w_f[x_f] + ⟨v, dense⟩                       first order (`_wide` tables + linear)
      + Σ_{i<j} ⟨e_i, e_j⟩ = ½ Σ_d ((Σ_f e_fd)² − Σ_f e_fd²)  FM second order over field embeddings
      + DNN([e_1, …, e_F, dense])                            deep (ReLU hidden `config.dnn` → 1)

i.e. Wide&Deep plus the FM term over the same embeddings, which is how it is built here.

TorchRec's own DeepFM pieces are not reused: `torchrec.modules.deepfm.FactorizationMachine`
flattens all fields into one vector before squaring, so it sums products of *every* pair of
scalars (across dims and within a field), not the per-dim field pairs of the FM; and
`torchrec.models.deepfm.SimpleDeepFMNN` has no first-order term and ends in a sigmoid.
"""

from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor

from ctrscale.models.wide_deep import WideDeep


def fm_second_order(embeddings: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} ⟨e_i, e_j⟩ for embeddings [B, F, D], in O(F·D) via the square-of-sum identity."""
    square_of_sum = embeddings.sum(dim=1).square()
    sum_of_squares = embeddings.square().sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)


class DeepFM(WideDeep):
    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor:
        fields, first_order = self.sparse_arch(sparse_features)
        return self.wide_and_deep_logit(fields, first_order, dense_features) + fm_second_order(
            fields
        )
