"""Model families the runtime supports: one adapter module per family, registered by class name."""

from __future__ import annotations

import torch.nn as nn

from .base import SUPPORTED_ATTENTION, ModelAdapter, Span, frame_spans, runs

# class name -> adapter factory; each family module adds its classes
ADAPTERS: dict = {}


def register(*class_names: str):
    def deco(factory):
        for name in class_names:
            ADAPTERS[name] = factory
        return factory

    return deco


def supported_models() -> list[str]:
    """The model classes ``visipruner.apply`` supports."""
    return sorted(ADAPTERS)


def get_adapter(model: nn.Module) -> ModelAdapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise TypeError(
            f"visipruner does not support model class {name}; supported model classes: {', '.join(supported_models())}"
        )
    adapter = ADAPTERS[name](model)
    adapter.check()
    return adapter


from . import gemma3, idefics3, internvl, llava, llava_next, qwen3_vl, qwen_vl  # noqa: E402,F401  (registration)

__all__ = ["ADAPTERS", "ModelAdapter", "SUPPORTED_ATTENTION", "Span", "frame_spans", "get_adapter", "register",
           "runs", "supported_models"]
