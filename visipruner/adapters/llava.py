"""LLaVA-1.5 (and its Llama / Qwen2 / Qwen3 language models)."""

from __future__ import annotations

from . import register
from .base import ModelAdapter

# language models whose attention has the Llama shape (q/k/v/o, RoPE passed in by the model,
# `layer_idx`, dispatch through AttentionInterface)
LLAMA_LIKE_TEXT_MODELS = ("llama", "qwen2", "qwen3", "mistral")


def check_text_model(family: str, text_config) -> None:
    if text_config.model_type not in LLAMA_LIKE_TEXT_MODELS:
        raise TypeError(
            f"{family} with a '{text_config.model_type}' language model is not supported; "
            f"supported language models: {', '.join(LLAMA_LIKE_TEXT_MODELS)}"
        )


class LlavaAdapter(ModelAdapter):
    family = "LLaVA"
    supports_pre_lm_methods = True

    def vision_dims(self):
        from ..flops import VisionDims

        # a CLIP tower and LLaVA's own two-layer projector (not, e.g., MobileVLM's pooling one)
        if (type(self.model).__name__ != "LlavaForConditionalGeneration"
                or type(self.multimodal.multi_modal_projector).__name__ != "LlavaMultiModalProjector"):
            return None
        return VisionDims.from_config(self.model.config)


@register("LlavaForConditionalGeneration")
def _llava(model) -> ModelAdapter:
    check_text_model("LLaVA", model.config.text_config)
    return LlavaAdapter(model, model.model, model.model.language_model, {"image": model.config.image_token_id})
