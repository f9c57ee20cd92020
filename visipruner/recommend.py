"""The VisiPruner config to use for a model when the user has not calibrated one."""

from __future__ import annotations

import warnings

from .config import VisiPrunerConfig

# Attribute of a model's config holding a calibrated VisiPruner config (a dict); it is saved by
# save_pretrained, so a calibrated model directory carries its own recommendation.
CONFIG_ATTRIBUTE = "visipruner_config"


def paper_defaults(num_layers: int) -> VisiPrunerConfig:
    """The paper's LLaVA-1.5-7B settings, with the shallow boundary (6 of 32 layers) scaled to depth."""
    return VisiPrunerConfig(shallow_layers=max(1, round(6 * num_layers / 32)))


def recommended_config(model) -> VisiPrunerConfig:
    """The calibrated config shipped with ``model``, else the paper's defaults scaled to its depth.

    The paper's thresholds are absolute numbers tuned on LLaVA-1.5-7B; on another model they can
    prune nothing or everything, so the fallback warns. ``visipruner calibrate`` finds settings.
    """
    stored = getattr(model.config, CONFIG_ATTRIBUTE, None)
    if stored:
        return VisiPrunerConfig.from_dict(stored)
    num_layers = model.config.get_text_config().num_hidden_layers
    warnings.warn(
        "no calibrated VisiPruner config for this model; using the paper's LLaVA-1.5-7B thresholds with "
        f"shallow_layers scaled to {num_layers} layers. Thresholds are model-specific: calibrate them.",
        stacklevel=2,
    )
    return paper_defaults(num_layers)
