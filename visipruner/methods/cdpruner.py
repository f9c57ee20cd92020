"""CDPruner (Zhang et al., NeurIPS 2025): keep the visual tokens of maximal conditional diversity.

A determinantal point process over the visual tokens whose kernel is their similarity
conditioned on the instruction:

* similarity ``S_ij = cos(x_i, x_j)`` between visual tokens ``x``;
* relevance ``r_i``: the mean cosine of token ``i`` to the instruction's tokens, min-max scaled
  to [0, 1] over the prompt's visual tokens;
* conditional kernel ``L = diag(r) S diag(r)``; the kept set is the greedy MAP of the DPP with
  kernel ``L``: start empty and add, ``budget`` times, the token that multiplies ``det(L_S)`` most,
  with the incremental Cholesky update of Chen et al. (NeurIPS 2018), O(n k^2).

What the tokens are: CDPruner on LLaVA takes the CLIP vision features and the CLIP *text*
encoder's embedding of the instruction. Most families have no text encoder aligned with their
vision tower (Qwen-VL, InternVL, Gemma3, Idefics3...), and their pre-projector features are not
one per language-model token (patch merging, pixel shuffle, pooling). What every family does
have is its language model's input: the projected visual tokens and the instruction tokens'
input embeddings, in one space the projector was trained to map images into. Both similarity and
relevance are computed there, on every family alike (LLaVA included). The official code also
negates the CLIP similarity before scaling; the paper's relevance is the similarity itself,
which is what is used here.

When the budget exceeds the kernel's rank (every remaining gain is numerically zero), the rest
of the budget is filled by relevance (ties: the earlier token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .budget import budget_tokens
from .input_selection import InputSelection, InputSelectionConfig

RANK_TOL = 1e-9  # a gain below this fraction of the largest diagonal entry counts as zero


@dataclass
class CDPrunerConfig(InputSelectionConfig):
    method = "cdpruner"

    def build(self):
        return CDPruner(self)


def instruction_relevance(visual: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
    """(m,) mean cosine of each visual token to the instruction tokens, min-max scaled to [0, 1]
    (all ones when the instruction is empty or every token is equally relevant)."""
    if instruction.shape[0] == 0:
        return torch.ones(visual.shape[0], dtype=torch.float64, device=visual.device)
    r = (F.normalize(visual.double(), dim=-1) @ F.normalize(instruction.double(), dim=-1).T).mean(-1)
    span = r.max() - r.min()
    return (r - r.min()) / span if span > 0 else torch.ones_like(r)


def conditional_kernel(visual: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """``diag(r) S diag(r)`` with ``S`` the cosine similarity of the visual tokens (float64)."""
    x = F.normalize(visual.double(), dim=-1)
    return relevance[:, None] * (x @ x.T) * relevance[None, :]


def greedy_dpp_map(kernel: torch.Tensor, k: int, fill_order: torch.Tensor) -> torch.Tensor:
    """Indices of ``k`` items in the order the greedy MAP of a DPP picks them.

    ``d2[i]`` is item i's gain ``det(L_{S+i}) / det(L_S)`` (the squared residual of its Cholesky
    row): start at ``diag(L)``; after picking ``j``, ``e = (L_j - C[:, j]^T C) / sqrt(d2[j])`` is
    the new Cholesky row and every gain drops by ``e^2``. Ties go to the earlier item. Once every
    gain is numerically zero the remaining picks follow ``fill_order``.
    """
    n = kernel.shape[0]
    k = min(k, n)
    gains = kernel.diagonal().clone()
    tol = RANK_TOL * float(gains.max()) if n else 0.0
    rows = kernel.new_zeros(k, n)
    taken = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    picks: list[int] = []
    for t in range(k):
        g = gains.masked_fill(taken, float("-inf"))
        j = int(g.argmax())  # first of equal maxima
        if not float(g[j]) > tol:
            break
        e = (kernel[j] - rows[:t, j] @ rows[:t]) / math.sqrt(float(g[j]))
        rows[t] = e
        gains = gains - e * e
        taken[j] = True
        picks.append(j)
    for j in fill_order.tolist():
        if len(picks) >= k:
            break
        if not taken[j]:
            taken[j] = True
            picks.append(int(j))
    return torch.tensor(picks, dtype=torch.long, device=kernel.device)


class CDPruner(InputSelection):
    name = "cdpruner"

    def select(self, visual: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        k = budget_tokens(self.config, visual.shape[0])
        r = instruction_relevance(visual, instruction)
        return greedy_dpp_map(conditional_kernel(visual, r), k, r.argsort(descending=True, stable=True))
