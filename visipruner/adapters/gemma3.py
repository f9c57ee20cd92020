"""Gemma3: bidirectional image blocks, sliding-window layers, per-layer-type RoPE.

Nothing here needs a hook: the model builds its masks by original position (an image's tokens see
each other when the prompt carries the processor's ``token_type_ids``; a sliding layer sees no key
``sliding_window`` or more positions back, within an image too) and hands
every layer the cos/sin of its layer type; the runtime slices both to the tokens still present,
so a kept token attends by its original position. In decode the runtime rebuilds each layer's
mask from the original positions its cache holds (a sliding cache keeps only the tail).
"""

from __future__ import annotations

from . import register
from .base import ModelAdapter


class Gemma3Adapter(ModelAdapter):
    family = "Gemma3"

    def check(self) -> None:
        super().check()
        if getattr(self.text_config, "use_bidirectional_attention", False):
            # an encoder (EmbeddingGemma): its attention is not causal where the model passes no
            # mask, which the runtime reads as plain causal
            raise ValueError("Gemma3 with use_bidirectional_attention=True (an embedding model) is not supported")


@register("Gemma3ForConditionalGeneration")
def _gemma3(model) -> ModelAdapter:
    return Gemma3Adapter(model, model.model, model.model.language_model, {"image": model.config.image_token_id})
