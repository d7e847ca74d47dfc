"""EXTRAP-SGD's extrapolation (Lin, Kong, Stich & Jaggi, "Extrapolation for Large-batch Training
in Deep Learning", ICML 2020, arXiv 2006.05720), in front of any base optimizer.

Local extragradient, per step t, on every rank k without communication for the first gradient:

    w'_k = w_t − γ·∇f(w_t; ξ_k)                  (the rank's LOCAL gradient, not all-reduced)
    g'   = all-reduce mean of ∇f(w'_k; ξ'_k)      (the second gradient, at each rank's w'_k)
    base optimizer applies g' at w_t             (the paper: SGD with Nesterov momentum)

Past-gradient variant (one backward per step): w' = w_t − γ·g'_{t−1}, with g'_{t−1} the
all-reduced gradient of the previous step (computed at the previous w'); step 1 does not move.
The rule is the paper's as recalled in the project's notes (only the abstract was at hand):
check it against the paper when available. Cost: the local variant is 2 forward+backward per
step plus one copy of the parameters; the past variant 1 forward+backward, one copy of the
parameters and one of the gradients.

Call sequence for the trainer (`params` = the dense parameters only: fused embedding tables
update inside the backward, so they stay at w_t and are not extrapolated):

    local (past_gradient=False):
        1. forward + backward on the batch WITHOUT gradient all-reduce (DDP `no_sync()`) and
           without the fused tables' backward (e.g. the dense part on the pooled embeddings
           detached), so `.grad` holds this rank's local dense gradient (of its own mean loss);
        2. `extrapolate(gamma)`: saves w, moves to w', clears `.grad`;
        3. forward + backward as usual (all-reduced; tables update as usual), at w';
        4. `restore()`: back to w, `.grad` (= g') untouched;
        5. gradient transforms if any, then the base optimizer's `step()`.
    past (past_gradient=True):
        1. `extrapolate(gamma)` before the forward; 2. forward + backward as usual;
        3. `restore()` (records g' for the next step); 4. transforms, base `step()`.
    Checkpoint `state_dict()` (the past gradient) with the optimizer's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ctrscale.optim.scaling import HyperparameterError


class Extrapolation:
    """Moves `params` to the extrapolated point and back; see the module docstring."""

    def __init__(self, params: Iterable[Tensor], past_gradient: bool = False) -> None:
        self.params = list(params)
        self.past_gradient = past_gradient
        self._saved: list[Tensor] | None = None
        self._past: list[Tensor | None] | None = None

    @torch.no_grad()
    def extrapolate(self, gamma: float) -> None:
        """w ← w − γ·d, saving w; d is each parameter's `.grad` (local variant, then cleared so
        the second backward starts from zero) or the previous step's g' (past variant)."""
        if gamma < 0:
            raise HyperparameterError(f"extrapolation gamma must be non-negative (got {gamma})")
        if self._saved is not None:
            raise RuntimeError("extrapolate() called twice without restore()")
        self._saved = [p.detach().clone() for p in self.params]
        if self.past_gradient:
            directions = self._past or [None] * len(self.params)
        else:
            directions = [p.grad for p in self.params]
        for param, direction in zip(self.params, directions, strict=True):
            if direction is not None:
                param.sub_(direction, alpha=gamma)
            if not self.past_gradient:
                param.grad = None

    @torch.no_grad()
    def restore(self) -> None:
        """w ← the saved w; `.grad` (g', computed at w') is left for the base optimizer, and
        kept as the next step's direction in the past variant."""
        if self._saved is None:
            raise RuntimeError("restore() called without extrapolate()")
        for param, saved in zip(self.params, self._saved, strict=True):
            param.copy_(saved)
        self._saved = None
        if self.past_gradient:
            self._past = [None if p.grad is None else p.grad.clone() for p in self.params]

    def state_dict(self) -> dict[str, Any]:
        return {"past_gradients": self._past}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        past = state["past_gradients"]
        if past is None:
            self._past = None
            return
        if len(past) != len(self.params):
            raise ValueError(f"{len(past)} past gradients for {len(self.params)} parameters")
        self._past = [
            None if g is None else g.to(p.device) for p, g in zip(self.params, past, strict=True)
        ]
