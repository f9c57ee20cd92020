"""Idefics3 and SmolVLM: the language model sits at ``model.model.text_model``.

An image is split into a grid of sub-images plus the whole image downscaled; each one's tokens are
one run of image tokens between ``<fake_token_around_image><row_r_col_c>`` (or ``<global-img>``)
text tokens, so each run is one span (a sub-image). The language model is a plain Llama.
"""

from __future__ import annotations

from . import register
from .base import ModelAdapter
from .llava import check_text_model


class Idefics3Adapter(ModelAdapter):
    family = "Idefics3"


@register("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
def _idefics3(model) -> ModelAdapter:
    family = "SmolVLM" if model.config.model_type == "smolvlm" else "Idefics3"
    check_text_model(family, model.config.text_config)
    a = Idefics3Adapter(model, model.model, model.model.text_model, {"image": model.config.image_token_id})
    a.family = family
    return a
