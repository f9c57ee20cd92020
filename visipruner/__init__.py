"""visipruner: training-free visual-token pruning for Hugging Face multimodal LLMs.

    import visipruner
    handle = visipruner.apply(model, visipruner.VisiPrunerConfig())
    model.generate(**inputs)
    handle.last_stats.fusion_layer
    handle.remove()
"""

from .adapters import supported_models
from .attention import Influence
from .config import AttentionSelectConfig, MethodConfig, VisiPrunerConfig
from .methods import (
    CONFIGS,
    CDPrunerConfig,
    DARTConfig,
    DivPruneConfig,
    Decision,
    FastVConfig,
    PDropConfig,
    PromptLayout,
    PruningMethod,
    RandomConfig,
    Schedule,
    SparseVLMConfig,
    VisionZipConfig,
    VisiPruner,
    VTWConfig,
    config_from_dict,
    config_from_json,
)
from .recommend import paper_defaults, recommended_config
from .runtime import PruneStats, PruningHandle, apply, handle_of

__all__ = [
    "AttentionSelectConfig",
    "CDPrunerConfig",
    "CONFIGS",
    "DARTConfig",
    "DivPruneConfig",
    "Decision",
    "FastVConfig",
    "MethodConfig",
    "PDropConfig",
    "RandomConfig",
    "SparseVLMConfig",
    "VTWConfig",
    "VisionZipConfig",
    "config_from_dict",
    "config_from_json",
    "Influence",
    "PromptLayout",
    "PruneStats",
    "PruningHandle",
    "PruningMethod",
    "Schedule",
    "VisiPruner",
    "VisiPrunerConfig",
    "apply",
    "handle_of",
    "paper_defaults",
    "recommended_config",
    "supported_models",
]
__version__ = "0.1.0"
