"""Tiny random LLaVA models built in-process, for tests and benchmarks (no downloads)."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 3


def tiny_llava(
    seed: int = 0,
    *,
    hidden: int = 64,
    layers: int = 8,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 128,
    image_size: int = 32,
    patch: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> LlavaForConditionalGeneration:
    """A random LLaVA with a Llama language model; (image_size/patch)^2 visual tokens per image."""
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 16), image_size=image_size, patch_size=patch,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    cfg.text_config._attn_implementation = attn_implementation
    cfg.vision_config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    return model


def tokens_per_image(model) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def random_prompt(model, *, seed: int = 0, prefix: int = 5, suffix: int = 12, images: int = 1, between: int = 4):
    """input_ids (1, n) with `images` image spans and random text around them, plus pixel_values."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    per = tokens_per_image(model)

    def text(k):
        return torch.randint(4, vocab, (k,), generator=g)

    parts = [torch.tensor([1]), text(prefix - 1)]
    for i in range(images):
        parts.append(torch.full((per,), IMAGE_TOKEN_ID))
        parts.append(text(between if i < images - 1 else suffix))
    ids = torch.cat(parts)[None]
    size = model.config.vision_config.image_size
    pixels = torch.randn(images, 3, size, size, generator=g)
    return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}
