"""Calibration's record-based predictions against the real runtime."""

from __future__ import annotations

import pytest
import torch

import visipruner
from visipruner.calibrate import Candidate, choose, parse_target, pareto_front, record, score_candidates
from visipruner.flops import Dims
from visipruner.testing import random_prompt, tiny_llava

torch.set_grad_enabled(False)


@pytest.mark.parametrize("relative", [False, True])
def test_recorded_predictions_match_the_runtime_up_to_the_fusion_layer(relative):
    model = tiny_llava(0, layers=10)
    prompts = [random_prompt(model, seed=s, images=1 + s % 2) for s in range(3)]
    rec = record(model, prompts, K=2, progress=False)
    dims = Dims.from_config(model.config.text_config)
    score = rec.norm / rec.onorm[..., None] if relative else rec.norm
    mc = rec.cos[:, 3:][~torch.tensor(rec.cos[:, 3:]).isnan().numpy()]
    def between(values):  # halfway between two recorded values, never on one
        v = sorted(values)
        return [float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2]

    layer_thrs = between(mc)
    token_thrs = between(score[:, 3:][score[:, 3:] > 0])
    # exit never triggers (no cosine exceeds 1): the predicted FLOPs are exact, not estimates
    for e, inp in enumerate(prompts):
        one = type(rec)(rec.K, rec.cos[e:e + 1], rec.norm[e:e + 1], rec.onorm[e:e + 1], rec.n_tokens[e:e + 1],
                        rec.n_visual[e:e + 1], rec.is_visual[e:e + 1])
        (cand,) = score_candidates(one, dims, layer_thrs, token_thrs, [1.0], [5], relative=relative)
        with visipruner.apply(model, cand.config) as h:
            model(**inp)
        s = h.last_stats
        if s.exit_layer is not None:  # cos == 1.0 exactly: not the case this test is about
            continue
        assert cand.flops_ratio == pytest.approx(s.prefill_flops_ratio, rel=1e-9)
        assert (cand.fusion_rate == 1.0) == (s.fusion_layer is not None)


def test_front_and_choice():
    cfg = visipruner.VisiPrunerConfig()
    cands = [Candidate(cfg, f, r, 1.0) for f, r in [(0.3, 5.0), (0.4, 2.0), (0.5, 3.0), (0.6, 1.0), (0.9, 0.0)]]
    assert [c.flops_ratio for c in pareto_front(cands)] == [0.3, 0.4, 0.6, 0.9]
    fin = [{"agreement": a, "flops_ratio": f} for a, f in [(0.9, 0.3), (0.97, 0.45), (0.99, 0.6), (1.0, 0.9)]]
    assert choose(fin, ("agreement", 0.98))["flops_ratio"] == 0.6
    assert choose(fin, ("flops", 0.5))["agreement"] == 0.97
    assert choose(fin, ("agreement", 1.01 - 0.001))["agreement"] == 1.0  # best available when unmet
    with pytest.raises(ValueError, match="'agreement' or 'flops'"):
        parse_target("accuracy=0.9")
    assert parse_target("flops=0.4") == ("flops", 0.4)
