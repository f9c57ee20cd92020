"""SparseVLM (Zhang et al. 2024): text-guided visual token sparsification with token recycling.

At a few layers (2/6/15 of 32, scaled to depth):

1. **Raters.** The text queries after the first image attend to the visual tokens; the rows whose
   total attention on visual tokens is at least the mean over rows are the raters (the question
   words that actually look at the image).
2. **Scores.** A visual token's score is its attention from the raters (head mean, averaged over
   raters). The top-scored tokens stay, up to the layer's budget.
3. **Recycling.** Of the dropped tokens, the ``recycle_ratio`` best-scored are clustered by their
   hidden states (density peaks on k-nearest-neighbour distances); each cluster is merged (mean)
   into its centre token, which stays at its own position. Recycled centres count against the
   layer's budget, so the number of visual tokens per layer is exactly the budget.

Budgets are fractions of the prompt's visual tokens: the published 192-token setting for LLaVA-1.5
keeps 300, 200 and 110 of 576 after layers 2, 6 and 15, an average of about 192 per layer.
Not implemented: the paper's rank-based adaptive budget (deleting ``lambda * (m - rank(P))``
tokens); budgets here are fixed, which is also what makes matched-budget comparisons possible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..attention import Influence
from ..config import MethodConfig, check_float, check_int
from .base import Decision, PromptLayout, PruningMethod

PUBLISHED_LAYERS = (2, 6, 15)  # of 32
PUBLISHED_FRACTIONS = (300 / 576, 200 / 576, 110 / 576)


@dataclass
class SparseVLMConfig(MethodConfig):
    layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "Sparsification layers; default 2/6/15 of 32 scaled to the model's depth."})
    keep_fractions: tuple[float, ...] = field(
        default=PUBLISHED_FRACTIONS,
        metadata={"help": "Visual tokens kept after each layer, as fractions of the prompt's visual tokens."})
    recycle_ratio: float = field(
        default=0.3, metadata={"help": "Fraction of the dropped tokens (best-scored first) that are recycled."})
    cluster_ratio: float = field(
        default=0.1, metadata={"help": "Clusters (merged tokens) per recycled token."})
    knn: int = field(default=5, metadata={"help": "Neighbours used for the density of the density-peak clustering."})
    method = "sparsevlm"

    def __post_init__(self):
        self.keep_fractions = tuple(float(f) for f in self.keep_fractions)
        if not self.keep_fractions:
            raise ValueError("keep_fractions: at least one layer is needed")
        for f in self.keep_fractions:
            check_float("keep_fractions", f, 0.0, 1.0)
        if any(b > a for a, b in zip(self.keep_fractions, self.keep_fractions[1:])):
            raise ValueError(f"keep_fractions must not increase from layer to layer, got {self.keep_fractions}")
        if self.layers is not None:
            self.layers = tuple(int(l) for l in self.layers)
            for l in self.layers:
                check_int("layers", l, 0, None)
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing, got {self.layers}")
            if len(self.layers) != len(self.keep_fractions):
                raise ValueError(
                    f"layers ({len(self.layers)}) and keep_fractions ({len(self.keep_fractions)}) differ in length")
        elif len(self.keep_fractions) != len(PUBLISHED_LAYERS):
            raise ValueError(f"with the default layers, keep_fractions needs {len(PUBLISHED_LAYERS)} entries")
        check_float("recycle_ratio", self.recycle_ratio, 0.0, 1.0)
        check_float("cluster_ratio", self.cluster_ratio, 0.0, 1.0)
        check_int("knn", self.knn, 1, None)

    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        out, prev = [], -1
        for l in PUBLISHED_LAYERS:  # scaled, kept distinct and increasing
            s = max(prev + 1, min(num_layers - 1, round(l * num_layers / 32)))
            out.append(s)
            prev = s
        return tuple(out)

    def build(self):
        return SparseVLM(self)


def density_peak_clusters(x: torch.Tensor, n_clusters: int, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres, assignment): indices of ``n_clusters`` centres among the rows of ``x`` and, for
    each row, the index (into ``centres``) of its nearest centre.

    Density rho_i = exp(-mean squared distance to the k nearest neighbours); delta_i = distance to
    the nearest denser row (the largest distance for the densest); centres maximise rho * delta.
    """
    n = x.shape[0]
    d = torch.cdist(x.double(), x.double())
    k = min(knn, n - 1)
    if k > 0:
        nn_d = d.topk(k + 1, dim=-1, largest=False).values[:, 1:]  # drop self (distance 0)
        rho = torch.exp(-(nn_d**2).mean(-1))
    else:
        rho = torch.ones(n, dtype=torch.float64)
    rank = torch.empty(n, dtype=torch.long)
    rank[rho.argsort(descending=True, stable=True)] = torch.arange(n)  # ties: the earlier row is denser
    denser = rank[None, :] < rank[:, None]  # [i, j]: row j is denser than row i
    delta = torch.where(denser, d, torch.full_like(d, float("inf"))).min(-1).values
    delta = torch.where(torch.isinf(delta), d.max(-1).values, delta)
    centres = (rho * delta).argsort(descending=True, stable=True)[:n_clusters]
    assign = d[:, centres].argmin(-1)
    assign[centres] = torch.arange(centres.numel())
    return centres, assign


class SparseVLM(PruningMethod):
    name = "sparsevlm"

    def __init__(self, config: SparseVLMConfig):
        self.config = config
        self.plan: dict[int, float] = {}
        self.log: dict[int, dict] = {}

    def start(self, layout: PromptLayout, num_layers: int) -> None:
        layers = self.config.layers_for(num_layers)
        bad = [l for l in layers if not 0 <= l < num_layers]
        if bad:
            raise ValueError(f"SparseVLM: layer(s) {bad} outside 0..{num_layers - 1}")
        self.plan = dict(zip(layers, self.config.keep_fractions))
        self.num_visual = layout.num_visual
        self.log = {}

    def needs_influence(self, layer: int) -> bool:
        return layer in self.plan

    def needs_text_attention(self, layer: int) -> bool:
        return layer in self.plan

    def decide(self, layer: int, influence: Influence | None, present: torch.Tensor):
        if layer not in self.plan or present.numel() == 0:
            return None
        m = present.numel()
        budget = min(m, math.ceil(self.plan[layer] * self.num_visual))
        ta = influence.text_attention
        if ta is None or ta.shape[0] == 0:  # no text after the image: the last row rates alone
            ta = influence.attention[None]
        mass = ta.sum(-1)
        raters = ta[mass >= mass.mean()]
        score = raters.mean(0)
        order = score.argsort(descending=True, stable=True)
        n_drop = m - budget
        n_recycle = math.floor(self.config.recycle_ratio * n_drop)
        n_clusters = min(n_recycle, math.ceil(self.config.cluster_ratio * n_recycle), budget)
        kept = order[: budget - n_clusters]
        merges = []
        if n_clusters > 0:
            cand = order[budget - n_clusters : budget - n_clusters + n_recycle]
            centres, assign = density_peak_clusters(influence.hidden[cand], n_clusters, self.config.knn)
            for c in range(centres.numel()):
                members = cand[assign == c]
                dest = cand[centres[c]]
                merges.append((int(present[dest]), [int(present[j]) for j in members if j != dest]))
            kept = torch.cat([kept, cand[centres]])
        keep = present[kept].sort().values
        self.log[layer] = {"kept": int(keep.numel()), "recycled": int(n_clusters), "raters": int(raters.shape[0])}
        return Decision(keep, merges)

    def summary(self) -> dict:
        return {"sparse_layers": sorted(self.plan), "per_layer": dict(self.log)}
