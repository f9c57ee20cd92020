"""The vision encoder and projector, counted separately from the language model's prefill."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import visipruner
from visipruner.testing import random_prompt, tiny_llava

torch.set_grad_enabled(False)


def _counted_by_torch(model, pixel_values) -> int:
    """torch's own FLOP counter over the vision tower + projector (eager attention, so that the
    attention products are matrix products it sees)."""
    model.model.vision_tower.config._attn_implementation = "eager"
    try:
        with FlopCounterMode(display=False) as fc:
            model.model.get_image_features(pixel_values=pixel_values)
    finally:
        model.model.vision_tower.config._attn_implementation = "sdpa"
    return fc.get_total_flops()


def test_vision_flops_equal_torchs_count_and_stay_out_of_the_prefill_ratio():
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0, images=2)
    with visipruner.apply(model, visipruner.VisiPrunerConfig(shallow_layers=2)) as h:
        model(**inputs)
    s = h.last_stats
    assert s.vision_flops == s.dense_vision_flops == _counted_by_torch(model, inputs["pixel_values"])
    # by hand, per image: 16 patches + CLS, width 32, MLP 64, one layer; projector 32 -> 64 -> 64
    n, d = 17, 32
    per_image = 2 * 16 * (3 * 8 * 8) * d + (2 * n * 4 * d * d + 4 * n * n * d + 2 * n * 2 * d * 64) \
        + 2 * 16 * (32 * 64 + 64 * 64)
    assert s.vision_flops == 2 * per_image
    with visipruner.apply(model, visipruner.VisiPrunerConfig(shallow_layers=2, stages=("middle",))) as h:
        model(**inputs)
    assert h.last_stats.dense_prefill_flops == s.dense_prefill_flops  # the ratio's denominator is the LM's alone


def test_visionzip_projects_fewer_tokens():
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0, images=2)
    with visipruner.apply(model, visipruner.VisionZipConfig()) as h:
        model(**inputs)
    s = h.last_stats
    kept = s.visual_tokens_per_layer[0]
    assert kept < 32 and s.dense_vision_flops == _counted_by_torch(model, inputs["pixel_values"])
    assert s.dense_vision_flops - s.vision_flops == 2 * (32 - kept) * (32 * 64 + 64 * 64)
