"""Per-architecture knowledge: where the decoder layers are, which id marks image tokens.

The runtime only talks to an adapter; supporting a new architecture means adding one here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

# Decoder families whose attention modules have the Llama shape (q/k/v/o projections, RoPE
# position embeddings passed in by the model, `layer_idx`, dispatch through AttentionInterface).
LLAMA_LIKE_TEXT_MODELS = ("llama", "qwen2")
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class ModelAdapter:
    model: nn.Module  # the user's model, e.g. LlavaForConditionalGeneration
    multimodal: nn.Module  # module whose forward sees input_ids and the cache (LlavaModel)
    language_model: nn.Module  # the decoder (LlamaModel)
    layers: nn.ModuleList
    image_token_id: int

    @property
    def text_config(self):
        return self.language_model.config

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn


def _llava(model: nn.Module) -> ModelAdapter:
    text_config = model.config.text_config
    if text_config.model_type not in LLAMA_LIKE_TEXT_MODELS:
        raise TypeError(
            f"LLaVA with a '{text_config.model_type}' language model is not supported; "
            f"supported language models: {', '.join(LLAMA_LIKE_TEXT_MODELS)}"
        )
    lm = model.model.language_model
    return ModelAdapter(
        model=model,
        multimodal=model.model,
        language_model=lm,
        layers=lm.layers,
        image_token_id=int(model.config.image_token_id),
    )


# class name -> adapter factory
ADAPTERS = {"LlavaForConditionalGeneration": _llava}


def get_adapter(model: nn.Module) -> ModelAdapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise TypeError(
            f"visipruner does not support model class {name}; supported model classes: {', '.join(sorted(ADAPTERS))}"
        )
    adapter = ADAPTERS[name](model)
    impl = adapter.text_config._attn_implementation
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {impl!r} is not supported; load the model with "
            f"attn_implementation='sdpa' (the fast path) or 'eager'"
        )
    return adapter
