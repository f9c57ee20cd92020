"""Calibration's record-based predictions against the real runtime."""

from __future__ import annotations

import pytest
import torch

import visipruner
from visipruner.calibrate import (Candidate, calibrate, choose, default_variants, parse_target, parse_variants,
                                  pareto_front, record, score_candidates)
from visipruner.flops import Dims
from visipruner.testing import random_prompt, tiny_llava

from fakes import FakeProcessor, FakeQuestion

torch.set_grad_enabled(False)


@pytest.mark.parametrize("shallow", [True, False])
@pytest.mark.parametrize("relative", [False, True])
def test_recorded_predictions_match_the_runtime_up_to_the_fusion_layer(relative, shallow):
    model = tiny_llava(0, layers=10)
    prompts = [random_prompt(model, seed=s, images=1 + s % 2) for s in range(3)]
    rec = record(model, prompts, K=2, progress=False, shallow=shallow)
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
        one = type(rec)(rec.K, rec.shallow, rec.cos[e:e + 1], rec.norm[e:e + 1], rec.onorm[e:e + 1], rec.n_tokens[e:e + 1],
                        rec.n_visual[e:e + 1], rec.is_visual[e:e + 1])
        (cand,) = score_candidates(one, dims, layer_thrs, token_thrs, [1.0], [5], relative=relative)
        assert ("shallow" in cand.config.stages) == shallow
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
    fin = [{"agreement": a, "flops_ratio": f, "examples": 200}
           for a, f in [(0.9, 0.3), (0.97, 0.45), (0.99, 0.6), (1.0, 0.9)]]
    assert choose(fin, ("agreement", 0.98), margin=False)["flops_ratio"] == 0.6
    # 0.99 on 200 examples is within one standard error (0.007) of 0.985: the margin skips it
    assert choose(fin, ("agreement", 0.985))["flops_ratio"] == 0.9
    assert choose(fin, ("agreement", 0.985), margin=False)["flops_ratio"] == 0.6
    assert choose(fin[:3], ("agreement", 0.985))["flops_ratio"] == 0.6  # no safe one: the bare target
    assert choose(fin, ("flops", 0.5))["agreement"] == 0.97
    assert choose(fin, ("agreement", 1.01 - 0.001))["agreement"] == 1.0  # best available when unmet
    with pytest.raises(ValueError, match="'agreement' or 'flops'"):
        parse_target("accuracy=0.9")
    assert parse_target("flops=0.4") == ("flops", 0.4)


def test_variants_parse_and_default():
    assert parse_variants("2,4, 6,2:off") == [(2, True), (4, True), (6, True), (2, False)]
    for bad in ("0", "x", "2:maybe", ","):
        with pytest.raises(ValueError, match="--shallow-layers"):
            parse_variants(bad)
    assert default_variants(30) == [(2, True), (4, True), (2, False)]
    assert default_variants(8) == [(1, True), (1, False)]


def test_calibrate_end_to_end_on_a_tiny_model():
    model = tiny_llava(0, layers=10)
    proc = FakeProcessor(model)
    res = calibrate(model, proc, [FakeQuestion(i) for i in range(4)], ("flops", 0.7),
                    [FakeQuestion(i) for i in range(4, 6)], variants=[(2, True), (2, False)],
                    finalists=2, refine=1, progress=False)
    assert res["candidates_scored"] > 10
    assert {v["shallow_stage"] for v in res["variants"]} == {True, False}
    assert res["finalists"] and res["chosen"] in res["finalists"]
    assert {f["round"] for f in res["finalists"]} <= {0, 1}
    for f in res["finalists"]:
        assert 0 <= f["agreement"] <= 1 and 0 < f["flops_ratio"] < 1.1 and f["examples"] == 4  # checks cost a little
    # the flops target is checked on the held-out prompts with the real runtime
    h = res["heldout"]
    assert h["examples"] == 2 and h["meets_target"] == (h["flops_ratio"] <= 0.7)
    cfg = visipruner.VisiPrunerConfig.from_dict(res["chosen"]["config"])
    assert cfg.to_dict() == res["chosen"]["config"]
