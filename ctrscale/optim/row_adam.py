"""Adam on the embedding rows a batch looks up, where FBGEMM has no fused Adam (CPU), and for
data-parallel tables.

Lazy, like FBGEMM's fused GPU Adam: only rows of the global batch are updated — their two
moments and their weights; rows absent from the batch keep moments and weights as they are
(a dense Adam would keep moving them with decaying momentum). Bias correction uses the number
of optimizer steps of the run (one counter, as FBGEMM's `iter`), so an id's first update after
a long absence is not inflated. Update, from Kingma & Ba (2015), Algorithm 1:

    m ← β1·m + (1−β1)·g;   v ← β2·v + (1−β2)·g²
    w ← w − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)

Hand-written because no maintained library updates a row subset of a tensor that is not a
parameter of its own (FBGEMM's TBE weights); it costs O(rows in the batch), never the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RowAdam:
    lr: float
    beta1: float
    beta2: float
    eps: float
    step: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    # Per local shard of a table: (exp_avg, exp_avg_sq), shaped like the shard.
    moments: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def add_shard(self, key: str, weight: Tensor) -> None:
        self.moments[key] = (torch.zeros_like(weight), torch.zeros_like(weight))

    def begin_step(self) -> None:
        self.step += 1

    @torch.no_grad()
    def update(self, key: str, weight: Tensor, rows: Tensor, grad: Tensor) -> None:
        """Adam step of `weight[rows]` with gradient rows `grad`; `rows` must be distinct."""
        exp_avg, exp_avg_sq = self.moments[key]
        t = int(self.step)
        m = exp_avg[rows].mul_(self.beta1).add_(grad, alpha=1.0 - self.beta1)
        v = exp_avg_sq[rows].mul_(self.beta2).addcmul_(grad, grad, value=1.0 - self.beta2)
        exp_avg[rows], exp_avg_sq[rows] = m, v
        denominator = (v / (1.0 - self.beta2**t)).sqrt_().add_(self.eps)
        weight[rows] -= (self.lr / (1.0 - self.beta1**t)) * m / denominator
