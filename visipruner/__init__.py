"""visipruner: training-free visual-token pruning for Hugging Face multimodal LLMs.

    import visipruner
    handle = visipruner.apply(model, visipruner.VisiPrunerConfig())
    model.generate(**inputs)
    handle.last_stats.fusion_layer
    handle.remove()
"""

from .attention import Influence
from .config import VisiPrunerConfig
from .methods import PromptLayout, PruningMethod, Schedule, VisiPruner
from .runtime import PruneStats, PruningHandle, apply

__all__ = [
    "Influence",
    "PromptLayout",
    "PruneStats",
    "PruningHandle",
    "PruningMethod",
    "Schedule",
    "VisiPruner",
    "VisiPrunerConfig",
    "apply",
]
__version__ = "0.1.0"
