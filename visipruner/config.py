"""Configuration of VisiPruner: a validated dataclass with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

STAGES = ("shallow", "middle", "deep")
EXIT_COUNTING = ("cumulative", "consecutive")


class MethodConfig:
    """Base of every method's config: a dataclass with a ``method`` name and a JSON round trip."""

    method: str = ""

    @property
    def enabled(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return {"method": self.method, **d}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        method = d.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"not a {cls.__name__}: method={method!r} (expected {cls.method!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cls.__name__}.from_json: invalid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}.from_json: expected a JSON object")
        return cls.from_dict(d)


@dataclass
class VisiPrunerConfig(MethodConfig):
    """The three stages of VisiPruner (see ``docs/method.md``).

    Thresholds are absolute numbers tuned on LLaVA-1.5-7B; on another model calibrate them.
    """

    stages: tuple[str, ...] = field(
        default=STAGES,
        metadata={"help": "Which stages run: any subset of ('shallow', 'middle', 'deep'); () disables pruning."},
    )
    shallow_layers: int = field(
        default=6,
        metadata={"help": "K: layers 0..K-1 are shallow (layer 0 merges, 1..K-1 disable text-to-vision attention)."},
    )
    layer_threshold: float = field(
        default=0.995,
        metadata={"help": "Fusion trigger: first layer > K where min_j cos(o - c_j, o) < this value. A cosine, in [-1, 1]."},
    )
    tokens_threshold: float = field(
        default=0.2,
        metadata={"help": "Critical tokens at the fusion layer: ||c_j||_2 > this value (absolute, model-specific). >= 0."},
    )
    exit_threshold: float = field(
        default=0.999,
        metadata={"help": "A deep layer shows no visual impact when min_j cos(o - c_j, o) >= this value. A cosine, in [-1, 1]."},
    )
    exit_patience: int = field(
        default=2,
        metadata={"help": "Number of no-impact layers after which all visual tokens are removed. >= 1."},
    )
    exit_counting: str = field(
        default="cumulative",
        metadata={"help": "'cumulative' (the reference code) or 'consecutive' (the paper's text) no-impact layers."},
    )
    relative_tokens_threshold: bool = field(
        default=False,
        metadata={
            "help": "Scale-free variant: a token is critical when ||c_j|| / ||o|| > tokens_threshold "
            "(independent of the model's value scale). Off: the paper's absolute ||c_j||."
        },
    )
    shallow_renormalise: bool = field(
        default=False,
        metadata={
            "help": "Variant: in layers 1..K-1 text queries drop visual keys entirely and their softmax is "
            "renormalised over the other keys (a true skip). Not the exact method; off by default."
        },
    )
    keep_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Budget mode: at the fusion layer keep the ceil(keep_ratio * visual tokens) most influential "
            "tokens (largest ||c_j||) instead of those over tokens_threshold. In (0, 1]; None: thresholds."
        },
    )
    keep_tokens: int | None = field(
        default=None,
        metadata={"help": "Budget mode with a token count: keep this many most influential tokens at fusion (at most "
                  "the prompt's visual tokens). >= 1; None: thresholds. Not together with keep_ratio."},
    )
    fusion_fallback_layer: int | None = field(
        default=None,
        metadata={
            "help": "If the layer threshold has not fired by this layer, fusion happens here (critical set chosen "
            "as usual: tokens_threshold or the budget). > shallow_layers; None: only the layer threshold decides."
        },
    )
    exit_by: int | None = field(
        default=None,
        metadata={
            "help": "Bound on the vision exit: layers from exit_by on hold no visual token (but a prompt's last one), "
            "even if the exit threshold has not fired (all leave after layer exit_by - 1). Lets a serving engine "
            "allocate those layers' KV cache for text only (vLLM plugin). >= 1; None: only the threshold decides."
        },
    )

    method = "visipruner"

    def __post_init__(self) -> None:
        if isinstance(self.stages, str):
            raise ValueError(f"stages must be a sequence of stage names from {STAGES}, got the string {self.stages!r}")
        self.stages = tuple(self.stages)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; allowed: {STAGES}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages: duplicate entries in {self.stages}")
        check_int("shallow_layers", self.shallow_layers, 1, None)
        check_float("layer_threshold", self.layer_threshold, -1.0, 1.0)
        check_float("tokens_threshold", self.tokens_threshold, 0.0, None)
        check_float("exit_threshold", self.exit_threshold, -1.0, 1.0)
        check_int("exit_patience", self.exit_patience, 1, None)
        if self.exit_counting not in EXIT_COUNTING:
            raise ValueError(f"exit_counting must be one of {EXIT_COUNTING}, got {self.exit_counting!r}")
        if not isinstance(self.relative_tokens_threshold, bool):
            raise ValueError(f"relative_tokens_threshold must be a bool, got {self.relative_tokens_threshold!r}")
        if not isinstance(self.shallow_renormalise, bool):
            raise ValueError(f"shallow_renormalise must be a bool, got {self.shallow_renormalise!r}")
        if self.keep_ratio is not None and self.keep_tokens is not None:
            raise ValueError("give one budget: keep_ratio or keep_tokens, not both")
        if self.keep_ratio is not None:
            check_float("keep_ratio", self.keep_ratio, 0.0, 1.0, low_open=True)
        if self.keep_tokens is not None:
            check_int("keep_tokens", self.keep_tokens, 1, None)
        if self.fusion_fallback_layer is not None:
            check_int("fusion_fallback_layer", self.fusion_fallback_layer, self.shallow_layers + 1, None)
        if (self.budgeted or self.fusion_fallback_layer is not None) and "middle" not in self.stages:
            raise ValueError("keep_ratio / keep_tokens / fusion_fallback_layer act at the fusion layer: "
                             f"add 'middle' to stages (got {self.stages})")
        if self.exit_by is not None:
            check_int("exit_by", self.exit_by, 1, None)
            if "deep" not in self.stages:
                raise ValueError(
                    f"exit_by bounds the deep stage's vision exit: add 'deep' to stages (got {self.stages})")

    @property
    def budgeted(self) -> bool:
        """Budget mode: the critical set is a number of tokens, not those over tokens_threshold."""
        return self.keep_ratio is not None or self.keep_tokens is not None

    def budget(self, num_visual: int) -> int | None:
        """Tokens kept at fusion for a prompt with ``num_visual`` visual tokens (None: thresholds)."""
        if self.keep_tokens is not None:
            return min(self.keep_tokens, num_visual)
        if self.keep_ratio is not None:
            return min(num_visual, max(1, math.ceil(self.keep_ratio * num_visual - 1e-9)))  # 1e-9: 0.1 * 30 is 3
        return None

    @property
    def enabled(self) -> bool:
        return bool(self.stages)

    def build(self, schedule=None):
        from .methods.visipruner import VisiPruner

        return VisiPruner(self, schedule=schedule)


@dataclass
class AttentionSelectConfig(VisiPrunerConfig):
    """VisiPruner with the critical set chosen by attention instead of value-aware influence.

    The paper's "attention vs value-aware" ablation: at the fusion layer keep as many tokens as
    ``||c_j|| > tokens_threshold`` would, but the ones the last token attends to most.
    """

    method = "attention"

    def build(self, schedule=None):
        from .methods.visipruner import VisiPruner

        return VisiPruner(self, schedule=schedule, selection="attention")


def check_int(name: str, value: Any, low: int | None, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {'inf' if high is None else high}], got {value}")


def check_float(name: str, value: Any, low: float | None, high: float | None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        raise ValueError(f"{name} must be in {lo}{low}, {'inf' if high is None else high}], got {value}")
