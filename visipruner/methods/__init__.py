"""Pruning methods: each a small object deciding what the shared runtime removes."""

from .base import Decision, PromptLayout, PruningMethod, Schedule
from .cdpruner import CDPruner, CDPrunerConfig
from .dart import DART, DARTConfig
from .divprune import DivPrune, DivPruneConfig
from .sparsevlm import SparseVLM, SparseVLMConfig
from .layer_drop import FastVConfig, PDropConfig, RandomConfig, ScoredLayerDrop, VTWConfig
from .visionzip import VisionZip, VisionZipConfig
from .visipruner import VisiPruner

__all__ = [
    "CDPruner", "CDPrunerConfig", "DART", "DARTConfig", "DivPrune", "DivPruneConfig", "Decision", "FastVConfig", "PDropConfig", "PromptLayout", "PruningMethod", "RandomConfig",
    "Schedule", "ScoredLayerDrop", "SparseVLM", "SparseVLMConfig", "VTWConfig", "VisiPruner", "VisionZip", "VisionZipConfig",
]

from ..config import AttentionSelectConfig, MethodConfig, VisiPrunerConfig  # noqa: E402

# method name (the "method" key of a config's JSON) -> config class
CONFIGS: dict[str, type[MethodConfig]] = {
    c.method: c
    for c in (VisiPrunerConfig, AttentionSelectConfig, FastVConfig, PDropConfig, VTWConfig, RandomConfig, DARTConfig, VisionZipConfig,
              SparseVLMConfig, CDPrunerConfig, DivPruneConfig)
}


def config_from_dict(d: dict) -> MethodConfig:
    """Any method's config from its dict form (``{"method": name, ...fields}``)."""
    name = d.get("method", "visipruner")
    if name not in CONFIGS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[name].from_dict(d)


def config_from_json(text: str) -> MethodConfig:
    import json

    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid config JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError("a method config must be a JSON object")
    return config_from_dict(d)
