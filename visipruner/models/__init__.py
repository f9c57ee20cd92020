"""Models shipped with visipruner (the embedded LLaVA "organism")."""

from .organism import load_model_dir, load_organism

__all__ = ["load_organism", "load_model_dir"]
