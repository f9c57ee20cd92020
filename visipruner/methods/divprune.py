"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse visual tokens (max-min diversity).

Token pruning as the max-min diversity problem: choose ``k`` of the visual tokens so that the
smallest pairwise distance among them, ``d_ij = 1 - cos(x_i, x_j)``, is as large as possible. The
problem is NP-hard; DivPrune solves it greedily: start from the token farthest from its nearest
neighbour, then repeatedly add the token whose distance to its nearest already-kept token is
largest (ties: the earlier token). The instruction plays no part.

The tokens are the language model's input (the projected visual tokens), where DivPrune itself
selects on LLaVA, and which every family has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .budget import budget_tokens
from .input_selection import InputSelection, InputSelectionConfig


@dataclass
class DivPruneConfig(InputSelectionConfig):
    method = "divprune"

    def build(self):
        return DivPrune(self)


def max_min_greedy(visual: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` tokens in the order the greedy max-min selection picks them."""
    n = visual.shape[0]
    k = min(k, n)
    x = F.normalize(visual.double(), dim=-1)
    dist = 1.0 - x @ x.T
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=visual.device)
    nearest = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=dist.device), float("inf")).min(-1).values
    picks = [int(nearest.argmax())]
    taken = torch.zeros(n, dtype=torch.bool, device=dist.device)
    taken[picks[0]] = True
    to_kept = dist[picks[0]].clone()  # each token's distance to its nearest kept token
    while len(picks) < k:
        j = int(to_kept.masked_fill(taken, float("-inf")).argmax())
        picks.append(j)
        taken[j] = True
        to_kept = torch.minimum(to_kept, dist[j])
    return torch.tensor(picks, dtype=torch.long, device=visual.device)


class DivPrune(InputSelection):
    name = "divprune"

    def select(self, visual: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        return max_min_greedy(visual, budget_tokens(self.config, visual.shape[0]))
