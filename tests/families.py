"""Each supported model family as the tests see it: a tiny random model built in-process and a
prompt maker. A family module of the package (``visipruner/adapters/``) gets an entry here, and
every test in ``test_families.py`` runs on it.

``prompt(model, seed, layout)`` returns ``(inputs, spans)``: the model's keyword inputs and the
[start, end) of each image (tile) and video frame, worked out here from how the prompt was
built (not from the package), so the reference merges onto the spans the family defines.
``layout`` is one of "one", "two" (two images) and "video".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from visipruner.testing import (
    IMAGE_TOKEN_ID,
    gemma3_prompt,
    idefics3_prompt,
    internvl_prompt,
    llava_next_prompt,
    qwen_vl_prompt,
    random_prompt,
    tiny_gemma3,
    tiny_idefics3,
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen_vl,
    tokens_per_image,
)


@dataclass
class Family:
    name: str
    build: Callable  # (seed, attn_implementation, layers) -> model
    prompt: Callable  # (model, seed, layout) -> (inputs, spans)
    layouts: tuple = ("one", "two")
    extra_keys: tuple = ()  # inputs besides input_ids/pixel_values the reference must pass on
    sliding: bool = False  # sliding-window layers; the "one" prompt is longer than the window
    marks: list = field(default_factory=list)
    batch_layouts: tuple = ()  # test_batches' two rows with images (default: "one" and the second layout)

    def reference_inputs(self, inputs):
        return {k: inputs[k] for k in self.extra_keys if k in inputs}

    def extend(self, inputs, new_ids):
        """The inputs for the prompt followed by generated tokens ``new_ids`` (1, t)."""
        out = dict(inputs)
        out["input_ids"] = torch.cat([inputs["input_ids"], new_ids], dim=1)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in inputs:
                out[key] = torch.cat([inputs[key], torch.zeros_like(new_ids)], dim=1)
        return out


def _llava_prompt(model, seed, layout):
    images = 2 if layout == "two" else 1
    inputs = random_prompt(model, seed=seed, images=images)
    per, spans, ids = tokens_per_image(model), [], inputs["input_ids"][0].tolist()
    i = 0
    while i < len(ids):
        if ids[i] == IMAGE_TOKEN_ID:
            spans.append((i, i + per))
            i += per
        else:
            i += 1
    return inputs, spans


def _qwen_prompt(model, seed, layout):
    if layout == "one":
        return qwen_vl_prompt(model, seed=seed, images=((8, 8),))
    if layout == "two":
        return qwen_vl_prompt(model, seed=seed, images=((8, 8), (4, 8)))
    return qwen_vl_prompt(model, seed=seed, images=((4, 4),), videos=((3, 4, 8),))


def _gemma3_prompt(model, seed, layout):
    # the window (12) is shorter than an image (16 tokens) and than every prompt; "long": the
    # image leaves the sliding layers' window before the prompt ends
    if layout == "long":
        return gemma3_prompt(model, seed=seed, images=1, suffix=20)
    return gemma3_prompt(model, seed=seed, images=2 if layout == "two" else 1)


def _internvl_prompt(model, seed, layout):
    return internvl_prompt(model, seed=seed, tiles=(2,) if layout == "one" else (1, 2))


def _llava_next_prompt(model, seed, layout):
    if layout.startswith("wide"):  # a 2 x 2 grid of tiles (the others have 1 x 2); "wide_video": and a video
        return llava_next_prompt(model, seed=seed, image_sizes=((64, 64),), video_frames=3 * layout.endswith("video"))
    if layout == "one":
        return llava_next_prompt(model, seed=seed, image_sizes=((30, 64),))
    if layout == "two":
        return llava_next_prompt(model, seed=seed, image_sizes=((30, 64), (40, 20)))
    return llava_next_prompt(model, seed=seed, image_sizes=((40, 20),), video_frames=3)


def _idefics3_prompt(model, seed, layout):
    if layout == "one":  # a 1 x 2 grid of sub-images and the global image: three spans
        return idefics3_prompt(model, seed=seed, grids=((1, 2),))
    return idefics3_prompt(model, seed=seed, grids=((1, 1), (1, 1)), pad_last=16)


LLAVA_NEXT_KEYS = ("image_sizes", "batch_num_images", "pixel_values_videos")

FAMILIES = [
    Family("llava", lambda seed, attn, layers: tiny_llava(seed, attn_implementation=attn, layers=layers), _llava_prompt),
    Family("qwen2_vl", lambda seed, attn, layers: tiny_qwen_vl(seed, version="2", attn_implementation=attn, layers=layers),
           _qwen_prompt, layouts=("one", "two", "video"),
           extra_keys=("image_grid_thw", "video_grid_thw", "pixel_values_videos", "mm_token_type_ids"),
           batch_layouts=("video", "two")),
    Family("qwen2_5_vl", lambda seed, attn, layers: tiny_qwen_vl(seed, version="2.5", attn_implementation=attn, layers=layers),
           _qwen_prompt, layouts=("one", "video"),
           extra_keys=("image_grid_thw", "video_grid_thw", "pixel_values_videos", "mm_token_type_ids")),
    Family("qwen3_vl", lambda seed, attn, layers: tiny_qwen_vl(seed, version="3", attn_implementation=attn, layers=layers),
           _qwen_prompt, layouts=("one", "two", "video"),
           extra_keys=("image_grid_thw", "video_grid_thw", "pixel_values_videos", "mm_token_type_ids")),
    Family("gemma3", lambda seed, attn, layers: tiny_gemma3(seed, attn_implementation=attn, layers=layers),
           _gemma3_prompt, layouts=("one", "two", "long"), extra_keys=("token_type_ids",), sliding=True),
    # InternVL: Qwen3 language model (q/k norms), tiles of one image in one span; and a Llama one
    Family("internvl", lambda seed, attn, layers: tiny_internvl(seed, lm="qwen3", attn_implementation=attn, layers=layers),
           _internvl_prompt),
    Family("internvl_llama", lambda seed, attn, layers: tiny_internvl(seed, lm="llama", attn_implementation=attn,
                                                                      layers=layers), _internvl_prompt, layouts=("one",),
           batch_layouts=("one", "two")),
    # LLaVA-NeXT: any-resolution tiles and newline tokens, one span per image (Qwen2 language model)
    Family("llava_next", lambda seed, attn, layers: tiny_llava_next(seed, attn_implementation=attn, layers=layers),
           _llava_next_prompt, extra_keys=LLAVA_NEXT_KEYS, batch_layouts=("wide", "two")),
    # LLaVA-OneVision: the same images; a video's frames one span each (Llama language model)
    Family("llava_onevision", lambda seed, attn, layers: tiny_llava_next(seed, onevision=True, lm="llama",
                                                                         attn_implementation=attn, layers=layers),
           _llava_next_prompt, layouts=("one", "two", "video"), extra_keys=LLAVA_NEXT_KEYS,
           batch_layouts=("wide_video", "two")),
    # Idefics3 / SmolVLM: language model at model.model.text_model, each sub-image a span
    Family("idefics3", lambda seed, attn, layers: tiny_idefics3(seed, attn_implementation=attn, layers=layers),
           _idefics3_prompt, extra_keys=("pixel_attention_mask",)),
    Family("smolvlm", lambda seed, attn, layers: tiny_idefics3(seed, smolvlm=True, attn_implementation=attn,
                                                               layers=layers),
           _idefics3_prompt, layouts=("one",), extra_keys=("pixel_attention_mask",), batch_layouts=("one", "two")),
]


def family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)
