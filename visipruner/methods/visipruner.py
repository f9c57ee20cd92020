"""VisiPruner's decisions: where each of the three stages acts. See docs/method.md.

Stage 1 (shallow, layers 0..K-1): layer 0 merges each image's visual attention mass of text
queries onto the image's first token; layers 1..K-1 zero text-to-vision probabilities.
Stage 2 (middle): from layer K+1, the first layer whose last-token influence
``min_j cos(o - c_j, o)`` drops below ``layer_threshold`` is the fusion layer; tokens with
``||c_j|| > tokens_threshold`` are critical and are the only visual tokens kept after it
(``||c_j|| / ||o||`` with ``relative_tokens_threshold``, a scale-free variant). Budget mode
(``keep_ratio`` / ``keep_tokens``) keeps the budget's largest ``||c_j||`` instead; with
``fusion_fallback_layer`` fusion happens there if the layer threshold has not fired before.
Stage 3 (deep): after the fusion layer, a layer with ``min_j cos >= exit_threshold`` over the
critical tokens has no visual impact; after ``exit_patience`` such layers (cumulative, as the
reference code counts, or consecutive) every visual token is removed. With ``exit_by`` every visual
token is removed after layer ``exit_by - 1`` at the latest (a bound a serving engine can plan memory on).
"""

from __future__ import annotations

import torch

from ..attention import Influence
from ..config import VisiPrunerConfig
from .base import PromptLayout, PruningMethod, Schedule


class VisiPruner(PruningMethod):
    name = "visipruner"

    def __init__(self, config: VisiPrunerConfig, schedule: Schedule | None = None, selection: str = "influence"):
        if selection not in ("influence", "attention"):
            raise ValueError(f"selection must be 'influence' or 'attention', got {selection!r}")
        self.config = config
        self.schedule = schedule
        self.selection = selection
        self.start(None, 0)

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def start(self, layout: PromptLayout | None, num_layers: int) -> None:
        self.fusion_layer: int | None = None
        self.exit_layer: int | None = None
        self.critical_tokens: torch.Tensor | None = None
        self.no_impact_layers = 0
        self.min_cos: dict[int, float] = {}  # per checked layer, for analysis
        self.num_critical_candidates: dict[int, int] = {}
        self.remaining = layout.num_visual if layout is not None else 0
        self.num_visual = self.remaining
        if self.schedule is not None and layout is not None:
            bad = [i for i in self.schedule.critical_tokens if not 0 <= i < layout.num_visual]
            if bad:
                raise ValueError(
                    f"Schedule.critical_tokens {bad[:5]} out of range for a prompt with {layout.num_visual} visual tokens"
                )

    def _has(self, stage: str) -> bool:
        return stage in self.config.stages

    def shallow_mode(self, layer: int) -> str | None:
        if not self._has("shallow") or layer >= self.config.shallow_layers:
            return None
        if layer == 0:
            return "merge"
        return "disable_renorm" if self.config.shallow_renormalise else "disable"

    def _deep_active(self) -> bool:
        return self._has("deep") and (self.fusion_layer is not None or not self._has("middle"))

    def _bound_exit(self, layer: int) -> bool:
        """Whether ``exit_by`` forces the vision exit after ``layer`` (the threshold has not fired by then)."""
        return self.config.exit_by is not None and self.exit_layer is None and layer >= self.config.exit_by - 1

    def needs_influence(self, layer: int) -> bool:
        if self.schedule is not None or layer <= self.config.shallow_layers or self.remaining == 0 \
                or self._bound_exit(layer):
            return False
        if self._has("middle") and self.fusion_layer is None:
            return True
        return self._deep_active() and self.exit_layer is None

    def decide(self, layer: int, influence: Influence | None, present: torch.Tensor) -> torch.Tensor | None:
        if self._bound_exit(layer):  # before a forced schedule too: engines plan memory on the bound
            self.exit_layer = layer
            self.remaining = 0
            return present[:0]
        if self.schedule is not None:
            return self._scheduled(layer, present)
        if influence is None:
            return None
        cfg = self.config
        self.min_cos[layer] = influence.min_cos
        if self._has("middle") and self.fusion_layer is None:
            score = influence.norm / influence.output_norm if cfg.relative_tokens_threshold else influence.norm
            self.num_critical_candidates[layer] = int((score > cfg.tokens_threshold).sum())
            fallback = cfg.fusion_fallback_layer is not None and layer >= cfg.fusion_fallback_layer
            if influence.min_cos < cfg.layer_threshold or fallback:
                self.fusion_layer = layer
                budget = cfg.budget(self.num_visual)
                if budget is None:
                    selected = score > cfg.tokens_threshold
                else:  # the budget's most influential tokens (ties: earlier token first)
                    selected = torch.zeros_like(score, dtype=torch.bool)
                    selected[influence.norm.argsort(descending=True, stable=True)[:budget]] = True
                if self.selection == "attention":  # same count, chosen by attention (ablation)
                    top = influence.attention.argsort(descending=True, stable=True)[: int(selected.sum())]
                    selected = torch.zeros_like(selected)
                    selected[top] = True
                self.critical_tokens = influence.visual_ids[selected]
                self.remaining = int(self.critical_tokens.numel())
                return self.critical_tokens
            return None
        # deep stage
        if influence.min_cos >= cfg.exit_threshold:
            self.no_impact_layers += 1
        elif cfg.exit_counting == "consecutive":
            self.no_impact_layers = 0
        if self.no_impact_layers >= cfg.exit_patience:
            self.exit_layer = layer
            self.remaining = 0
            return present[:0]
        return None

    def _scheduled(self, layer: int, present: torch.Tensor) -> torch.Tensor | None:
        s = self.schedule
        if layer == s.fusion_layer:
            self.fusion_layer = layer
            self.critical_tokens = torch.tensor(s.critical_tokens, dtype=torch.long, device=present.device)
            return self.critical_tokens
        if layer == s.exit_layer and self.exit_layer is None:  # not when exit_by already removed them
            self.exit_layer = layer
            return present[:0]
        return None

    def summary(self) -> dict:
        return {
            "fusion_layer": self.fusion_layer,
            "exit_layer": self.exit_layer,
            "critical_tokens": [] if self.critical_tokens is None else self.critical_tokens.tolist(),
            "min_cos_per_layer": dict(self.min_cos),
        }

    def schedule_of_last_prompt(self) -> Schedule:
        """The decisions just taken, as a Schedule that replays them."""
        return Schedule(
            fusion_layer=self.fusion_layer,
            critical_tokens=self.summary()["critical_tokens"],
            exit_layer=self.exit_layer,
        )
