"""DART (Wen et al. 2025): drop visual tokens that duplicate a few pivot tokens.

At layer K (default 2) pick ``pivots`` visual tokens with the largest hidden-state norm (the
layer's input), then keep the pivots plus the tokens least similar (max cosine over pivots) to
them, up to ``keep_ratio`` of the visual tokens. Duplication, not attention, decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..attention import Influence
from ..config import MethodConfig, check_int
from .base import PromptLayout, PruningMethod
from .budget import check_budget


@dataclass
class DARTConfig(MethodConfig):
    layer: int = field(default=2, metadata={"help": "K: duplicates are removed after this layer."})
    keep_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of visual tokens kept (default 0.222 = 128 of 576)."})
    pivots: int = field(default=8, metadata={"help": "Number of pivot tokens (largest hidden-state norm)."})
    keep_tokens: int | None = field(default=None, metadata={"help": "Visual tokens kept, instead of keep_ratio."})
    method = "dart"

    def __post_init__(self):
        check_int("layer", self.layer, 0, None)
        check_budget(self, 0.222, allow_none_kept=True)
        check_int("pivots", self.pivots, 1, None)

    def build(self):
        return DART(self)


class DART(PruningMethod):
    name = "dart"

    def __init__(self, config: DARTConfig):
        self.config = config

    def start(self, layout: PromptLayout, num_layers: int) -> None:
        if not 0 <= self.config.layer < num_layers:
            raise ValueError(f"DART: layer {self.config.layer} outside 0..{num_layers - 1}")
        self.pivot_ids: list[int] = []

    def needs_influence(self, layer: int) -> bool:
        return layer == self.config.layer

    def decide(self, layer: int, influence: Influence | None, present: torch.Tensor) -> torch.Tensor | None:
        if layer != self.config.layer or present.numel() == 0:
            return None
        h = influence.hidden.float()
        keep_n = (min(self.config.keep_tokens, present.numel()) if self.config.keep_tokens is not None
                  else int(torch.tensor(self.config.keep_ratio * present.numel()).ceil()))
        p = min(self.config.pivots, keep_n)
        pivots = h.norm(dim=-1).argsort(descending=True, stable=True)[:p]
        sim = F.normalize(h, dim=-1) @ F.normalize(h[pivots], dim=-1).T  # (m, p)
        dup = sim.max(dim=-1).values
        dup[pivots] = float("-inf")  # pivots always stay
        order = dup.argsort(stable=True)[:keep_n]
        self.pivot_ids = present[pivots].tolist()
        return present[order].sort().values

    def summary(self) -> dict:
        return {"pivots": self.pivot_ids}
