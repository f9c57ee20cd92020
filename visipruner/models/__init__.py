"""Models shipped with visipruner (the embedded LLaVA "organism") and loaders (MobileVLM)."""

from .mobilevlm import load_mobilevlm
from .organism import load_model_dir, load_organism

__all__ = ["load_organism", "load_model_dir", "load_mobilevlm"]
