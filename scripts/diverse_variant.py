"""Experiment (issue 22, "beyond the paper"): VisiPruner's middle stage with influence-weighted
diversity, kept here and not in the library because it did not beat plain VisiPruner outside the
bootstrap intervals (docs/calibrate.md, "Beyond the paper").

At the fusion layer, budget mode keeps the ``k`` tokens with the largest influence ``||c_j||``.
Tokens of one object carry near-duplicate hidden states, so the top-k can spend the budget on
one region. The variant keeps the greedy MAP set of a determinantal point process whose kernel
is ``L = diag(q) S diag(q)``: quality ``q_j = ||c_j||`` (VisiPruner's own influence, what the
paper's threshold ranks by) and similarity ``S`` the cosine of the tokens' hidden states entering
the layer. That is CDPruner's conditional DPP with the instruction relevance replaced by the
last token's measured influence: a set is good when its tokens are influential *and* different.

Used by ``scripts/agreement.py`` (a config JSON with ``"method": "visipruner_diverse"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visipruner.config import VisiPrunerConfig
from visipruner.methods.visipruner import VisiPruner


def greedy_dpp(quality: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the greedy MAP set of size ``k`` for ``L = diag(q) (X X^T) diag(q)``, X the
    L2-normalised features (incremental Cholesky, Chen et al. 2018); when the kernel's rank runs
    out, the rest by quality. In selection order."""
    x = F.normalize(features.double(), dim=-1)
    q = quality.double()
    L = q[:, None] * (x @ x.T) * q[None, :]
    m = L.shape[0]
    k = min(k, m)
    gains = L.diagonal().clone()  # marginal gain of each token given the chosen set
    rows = torch.zeros(k, m, dtype=torch.double)
    chosen: list[int] = []
    for t in range(k):
        gains_open = gains.clone()
        gains_open[chosen] = -math.inf
        j = int(gains_open.argmax())
        if gains_open[j] <= 1e-12:  # rank exhausted: fill by influence
            rest = [i for i in q.argsort(descending=True, stable=True).tolist() if i not in chosen]
            chosen += rest[: k - len(chosen)]
            break
        chosen.append(j)
        e = (L[j] - rows[:t, j] @ rows[:t]) / gains[j].sqrt()
        rows[t] = e
        gains = gains - e * e
    return torch.tensor(chosen, dtype=torch.long)


@dataclass
class DiverseVisiPrunerConfig(VisiPrunerConfig):
    """VisiPruner in budget mode with the critical set chosen by an influence-weighted DPP."""

    method = "visipruner_diverse"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.budgeted:
            raise ValueError("visipruner_diverse selects a budget: give keep_ratio or keep_tokens")

    def build(self, schedule=None):
        return DiverseVisiPruner(self, schedule=schedule)


class DiverseVisiPruner(VisiPruner):
    name = "visipruner_diverse"

    def decide(self, layer, influence, present):
        keep = super().decide(layer, influence, present)
        if keep is not None and self.fusion_layer == layer and self.schedule is None and keep.numel():
            picked = greedy_dpp(influence.norm, influence.hidden, keep.numel())
            self.critical_tokens = influence.visual_ids[picked.sort().values]
            return self.critical_tokens
        return keep
