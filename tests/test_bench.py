"""Budget matching and the bench's summary arithmetic (the full bench runs on the embedded model)."""

from __future__ import annotations

import pytest
import torch

import visipruner
from visipruner import VisiPrunerConfig
from visipruner.bench import _avg_fraction_layer_drop, matched_configs
from visipruner.testing import random_prompt, tiny_llava

torch.set_grad_enabled(False)


def test_average_fraction_formula():
    # 8 layers; keep half after layer 2 (layers 3..7 see half): (3 + 5 * 0.5) / 8
    assert _avg_fraction_layer_drop(8, [(2, 0.5)]) == pytest.approx((3 + 2.5) / 8)
    # pyramid: after 1 keep .5, after 3 keep .5 of that
    assert _avg_fraction_layer_drop(8, [(1, 0.5), (3, 0.5)]) == pytest.approx((2 + 2 * 0.5 + 4 * 0.25) / 8)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_matched_configs_hit_the_budget_when_run(fraction):
    model = tiny_llava(0, layers=16, image_size=64)  # 64 visual tokens
    inputs = random_prompt(model, seed=0)
    n_vis = 64
    cfgs = matched_configs(16, fraction, VisiPrunerConfig(shallow_layers=2))
    for name in ("fastv", "pdrop", "dart", "random", "vtw", "visionzip"):
        with visipruner.apply(model, cfgs[name]) as h:
            model(**inputs)
        measured = h.last_stats.avg_visual_tokens / n_vis
        # token counts are whole numbers (ceil) and VTW's layer is an integer: within one layer's share
        assert measured == pytest.approx(fraction, abs=1 / 16 + 1 / n_vis), name
