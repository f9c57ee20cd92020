"""InternVL 2.5 / 3 / 3.5 in the Hugging Face format (``InternVLForConditionalGeneration``).

The vision tower's features (pixel-shuffled, projected) replace the image tokens of the prompt;
all tiles of one image (crops and thumbnail) are one run of image tokens between ``<img>`` and
``</img>``, so each run is one image span. The language model is a plain Llama, Qwen2 or Qwen3
(q/k norms) decoder with 1-D positions: nothing else for the runtime to know.
"""

from __future__ import annotations

from . import register
from .base import ModelAdapter
from .llava import check_text_model


class InternVLAdapter(ModelAdapter):
    family = "InternVL"


@register("InternVLForConditionalGeneration")
def _internvl(model) -> ModelAdapter:
    check_text_model("InternVL", model.config.text_config)
    return InternVLAdapter(model, model.model, model.model.language_model, {"image": model.config.image_token_id})
