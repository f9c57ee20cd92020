"""Peers that drop visual tokens at fixed layers, keeping the best-scored fraction.

FastV, PyramidDrop, VTW and random pruning differ only in where they act, how much they keep,
and how they score tokens; the runtime does the removal. Each config here is one dataclass.

* FastV (Chen et al. 2024): at layer K (default 2) keep the top R (default 50%) of the visual
  tokens by the last token's attention (mean over heads).
* PyramidDrop (Xing et al. 2024): at several layers (8/16/24 of 32, scaled to depth) keep a
  fraction (default 50%) of the visual tokens present, by the last token's attention.
* VTW, vision token withdrawal (Lin et al. 2024): all visual tokens leave at layer K (default:
  half the depth).
* Random: keep a random fraction at layer K (a floor for any scoring rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention import Influence
from ..config import MethodConfig, check_float, check_int
from .base import PromptLayout, PruningMethod
from .budget import check_budget


def _depth_scaled(layers_of_32: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, min(num_layers - 1, round(l * num_layers / 32))) for l in layers_of_32}))


class ScoredLayerDrop(PruningMethod):
    """At each of ``layers`` keep ``ceil(ratio * present)`` visual tokens with the highest score
    (``tokens``: that many instead, at most those present)."""

    def __init__(self, config, layers, ratios, score: str, seed: int = 0, tokens: int | None = None):
        self.config = config
        self._layers, self._ratios, self.score, self.seed, self.tokens = layers, ratios, score, seed, tokens
        self.plan: dict[int, float] = {}
        self.dropped_at: dict[int, int] = {}

    def start(self, layout: PromptLayout, num_layers: int) -> None:
        layers = self._layers(num_layers) if callable(self._layers) else self._layers
        bad = [l for l in layers if not 0 <= l < num_layers]
        if bad:
            raise ValueError(f"{type(self).__name__}: layer(s) {bad} outside 0..{num_layers - 1}")
        self.plan = dict(zip(layers, self._ratios if len(self._ratios) == len(layers) else [self._ratios[0]] * len(layers)))
        self.dropped_at = {}
        self._gen = torch.Generator().manual_seed(self.seed)

    def needs_influence(self, layer: int) -> bool:
        return layer in self.plan and self.score == "attention"

    def decide(self, layer: int, influence: Influence | None, present: torch.Tensor) -> torch.Tensor | None:
        if layer not in self.plan or present.numel() == 0:
            return None
        keep_n = (min(self.tokens, present.numel()) if self.tokens is not None
                  else int(torch.tensor(self.plan[layer] * present.numel()).ceil()))
        if self.score == "attention":
            order = influence.attention.argsort(descending=True, stable=True)
        else:
            order = torch.randperm(present.numel(), generator=self._gen).to(present.device)
        keep = present[order[:keep_n]].sort().values
        self.dropped_at[layer] = int(present.numel() - keep.numel())
        return keep

    def summary(self) -> dict:
        return {"drop_layers": sorted(self.plan), "dropped_at": dict(self.dropped_at)}


def _check_ratio(name, value):
    check_float(name, value, 0.0, 1.0)


@dataclass
class FastVConfig(MethodConfig):
    layer: int = field(default=2, metadata={"help": "K: visual tokens are pruned after this layer."})
    keep_ratio: float | None = field(
        default=None, metadata={"help": "R: fraction of visual tokens kept, by last-token attention (default 0.5)."})
    keep_tokens: int | None = field(default=None, metadata={"help": "Visual tokens kept, instead of keep_ratio."})
    method = "fastv"

    def __post_init__(self):
        check_int("layer", self.layer, 0, None)
        check_budget(self, 0.5, allow_none_kept=True)

    def build(self):
        return ScoredLayerDrop(self, (self.layer,), (self.keep_ratio,), "attention", tokens=self.keep_tokens)


@dataclass
class PDropConfig(MethodConfig):
    layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "Drop layers; default 8/16/24 of 32 scaled to the model's depth."})
    keep_ratio: float = field(default=0.5, metadata={"help": "Fraction of the present visual tokens kept at each drop layer."})
    method = "pdrop"

    def __post_init__(self):
        if self.layers is not None:
            self.layers = tuple(self.layers)
            for l in self.layers:
                check_int("layers", l, 0, None)
        _check_ratio("keep_ratio", self.keep_ratio)

    def build(self):
        layers = self.layers if self.layers is not None else (lambda n: _depth_scaled((8, 16, 24), n))
        return ScoredLayerDrop(self, layers, (self.keep_ratio,), "attention")


@dataclass
class VTWConfig(MethodConfig):
    layer: int | None = field(default=None, metadata={"help": "K: all visual tokens leave after it; default half the depth."})
    method = "vtw"

    def __post_init__(self):
        if self.layer is not None:
            check_int("layer", self.layer, 0, None)

    def build(self):
        layers = (self.layer,) if self.layer is not None else (lambda n: (n // 2,))
        return ScoredLayerDrop(self, layers, (0.0,), "random")


@dataclass
class RandomConfig(MethodConfig):
    layer: int = field(default=2, metadata={"help": "Visual tokens are pruned after this layer."})
    keep_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of visual tokens kept, uniformly at random (default 0.5)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random choice (per prompt, reset each prompt)."})
    keep_tokens: int | None = field(default=None, metadata={"help": "Visual tokens kept, instead of keep_ratio."})
    method = "random"

    def __post_init__(self):
        check_int("layer", self.layer, 0, None)
        check_budget(self, 0.5, allow_none_kept=True)
        check_int("seed", self.seed, 0, None)

    def build(self):
        return ScoredLayerDrop(self, (self.layer,), (self.keep_ratio,), "random", seed=self.seed, tokens=self.keep_tokens)
