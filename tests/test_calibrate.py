"""Calibration's record-based predictions against the real runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import visipruner
from visipruner.calibrate import (Candidate, calibrate, choose, default_variants, parse_target, parse_variants,
                                  pareto_front, record, score_candidates)
from visipruner.flops import Dims
from visipruner.inputs import InputError
from visipruner.testing import random_prompt, tiny_llava

from fakes import FakeProcessor, FakeQuestion
from reference import reference_forward

torch.set_grad_enabled(False)


def _record_low(values, start):
    """(index, threshold): the first index >= ``start`` whose value is below every earlier one, and
    a threshold strictly between it and the earlier minimum (a ``< threshold`` trigger fires there
    first). None when no such index exists."""
    for i in range(max(start, 1), len(values)):
        if values[i] < min(values[:i]):
            return i, (values[i] + min(values[:i])) / 2
    return None


@pytest.mark.parametrize("shallow", [True, False])
@pytest.mark.parametrize("relative", [False, True])
def test_recorded_predictions_match_the_runtime_with_late_fusion_and_exit(relative, shallow):
    """Fusion and exit placed by their thresholds, later than the first layers they could take.

    Two kinds of case where the records predict the runtime exactly: (a) a strict critical subset
    (half the tokens) and no exit (exit decisions after a removal are estimates); (b) every visual
    token critical (the pruned run equals the recorded one up to the exit), exit with patience 1
    at a layer past the first one after fusion. Fusion is at a layer past the first checked one
    wherever the recorded cosines allow it (model seeds 1 and 3 have such prompts)."""
    L, K = 10, 2
    counts = {"a": 0, "b": 0, "late_fusion": 0}
    for model_seed in (1, 3):
        model = tiny_llava(model_seed, layers=L)
        prompts = [random_prompt(model, seed=s, images=1 + s % 2) for s in range(4)]
        rec = record(model, prompts, K=K, progress=False, shallow=shallow)
        dims = Dims.from_config(model.config.text_config)
        score = rec.norm / rec.onorm[..., None] if relative else rec.norm
        for e, inp in enumerate(prompts):
            one = type(rec)(rec.K, rec.shallow, rec.cos[e:e + 1], rec.norm[e:e + 1], rec.onorm[e:e + 1],
                            rec.n_tokens[e:e + 1], rec.n_visual[e:e + 1], rec.is_visual[e:e + 1])
            m = int(rec.n_visual[e])
            min_cos = [float(rec.cos[e, layer, :m].min()) for layer in range(K + 1, L)]  # layers K+1..L-1
            low = _record_low(min_cos, 1)
            if low is None:  # the first checked layer has the lowest min cos: fusion there
                low = (0, (min_cos[0] + min([c for c in min_cos if c > min_cos[0]] + [1.0])) / 2)
            fusion, layer_thr = K + 1 + low[0], low[1]
            sc = np.sort(score[e, fusion, :m])
            tok_half = float(sc[m // 2 - 1] + sc[m // 2]) / 2
            cases = [("a", tok_half, 1.0, None)]
            # (b): exit at the first layer after fusion whose min cos is above every one between
            high = _record_low([-c for c in min_cos[fusion - K:]], 1)  # layers fusion+1..; negated
            if high is not None:
                cases.append(("b", 0.0, -high[1], fusion + 1 + high[0]))
            for kind, tok_thr, exit_thr, exit_layer in cases:
                (cand,) = score_candidates(one, dims, [layer_thr], [tok_thr], [exit_thr], [1], relative=relative)
                assert ("shallow" in cand.config.stages) == shallow and cand.fusion_rate == 1.0
                with visipruner.apply(model, cand.config) as h:
                    model(**inp)
                s = h.last_stats
                if kind == "a" and s.exit_layer is not None:  # a cosine of exactly 1.0: not this case
                    continue
                assert (s.fusion_layer, s.exit_layer) == (fusion, exit_layer), kind
                assert len(s.critical_tokens) == (m - m // 2 if kind == "a" else m), kind
                assert cand.flops_ratio == pytest.approx(s.prefill_flops_ratio, rel=1e-9), kind
                counts[kind] += 1
                counts["late_fusion"] += fusion > K + 1
    # the loop did not skip everything, and fusion and exit landed past their first possible layers
    assert counts["a"] >= 6 and counts["b"] >= 4 and counts["late_fusion"] >= 2, counts


@pytest.mark.parametrize("shallow", [True, False])
def test_recorded_predictions_match_the_runtime_with_fallback_and_budget(shallow):
    """Fusion at the fallback layer (the layer threshold never fires) or by the threshold before it,
    keeping a budget: the predicted FLOPs, fusion rate and kept count are the runtime's."""
    L, K = 10, 2
    model = tiny_llava(1, layers=L)
    prompts = [random_prompt(model, seed=s, images=1 + s % 2) for s in range(3)]
    rec = record(model, prompts, K=K, progress=False, shallow=shallow)
    dims = Dims.from_config(model.config.text_config)
    cands = score_candidates(rec, dims, [-1.0, 1.0], [0.0], [1.5], [1], relative=False, fallbacks=[None, 6],
                             budgets=[0.25])
    by = {(c.config.layer_threshold, c.config.fusion_fallback_layer, c.config.keep_ratio): c for c in cands}
    assert len(cands) == 8 and by[(-1.0, None, 0.25)].fusion_rate == 0.0 and by[(-1.0, 6, 0.25)].fusion_rate == 1.0
    for (lt, fb, ratio), cand in by.items():
        flops = []
        for inp in prompts:
            with visipruner.apply(model, cand.config) as h:
                model(**inp)
            s = h.last_stats
            fusion = K + 1 if lt == 1.0 else fb
            assert s.fusion_layer == fusion and s.exit_layer is None
            if fusion is not None and ratio is not None:
                assert len(s.critical_tokens) == cand.config.budget(s.num_visual_tokens)
            flops.append(s.prefill_flops_ratio)
        assert cand.flops_ratio == pytest.approx(np.mean(flops), rel=1e-9), cand.config


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
    # 15 of 15 is not a certainty: its smoothed error (0.06) keeps it from being "safe" at 0.95
    small = [{"agreement": 1.0, "flops_ratio": 0.4, "examples": 15}, {"agreement": 0.99, "flops_ratio": 0.6, "examples": 400}]
    assert choose(small, ("agreement", 0.95))["flops_ratio"] == 0.6
    # several sources: the worst source decides (0.99 overall hides a source at 0.90)
    src = lambda a, b: {"by_source": {"scenes": {"agreement": a, "examples": 100},  # noqa: E731
                                      "photos": {"agreement": b, "examples": 100}}}
    mixed = [{"agreement": 0.99, "flops_ratio": 0.4, "examples": 200, **src(1.0, 0.90)},
             {"agreement": 0.97, "flops_ratio": 0.45, "examples": 200, **src(0.97, 0.97)}]
    assert choose(mixed, ("agreement", 0.95), margin=False)["flops_ratio"] == 0.45
    assert choose(mixed, ("flops", 0.5))["flops_ratio"] == 0.45
    # a config that leaves one source unpruned is passed over when pruning is required
    mixed[1]["by_source"]["photos"]["pruned_rate"] = 0.05
    mixed.append({"agreement": 0.96, "flops_ratio": 0.48, "examples": 200, **src(0.96, 0.96)})
    assert choose(mixed, ("agreement", 0.95), margin=False)["flops_ratio"] == 0.45
    assert choose(mixed, ("agreement", 0.95), margin=False, min_pruned=0.9)["flops_ratio"] == 0.48
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


def _hand_prefill_flops(model, ids, cfg, ref):
    """Prefill FLOPs of ``cfg`` on a one-image prompt, counted query by query from the lengths the
    slow reference executed (docs/method.md's FLOPs rules, not the package's counters)."""
    t = model.config.text_config
    head_dim = t.hidden_size // t.num_attention_heads
    d, q, kv, mlp = t.hidden_size, t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim, t.intermediate_size
    per_token = 2 * (d * q + 2 * d * kv + q * d) + 2 * 3 * d * mlp
    is_vis = (ids[0] == model.config.image_token_id).tolist()
    n0, n_vis, first = len(is_vis), sum(is_vis), is_vis.index(True)
    assert is_vis[first:first + n_vis] == [True] * n_vis  # one image
    total = dense = 0
    for layer, present in enumerate(ref.visual_tokens_per_layer):
        n = n0 - (n_vis - present)
        score = weighted = n * (n + 1) // 2  # causal
        if "shallow" in cfg.stages and layer < cfg.shallow_layers:  # text rows after the image
            score = weighted = 0
            for i in range(n0):
                score += i + 1  # every query scores every earlier key
                text_after = i > first and not is_vis[i]
                # a text row's weighted sum skips the visual values (plus the merged one in layer 0)
                weighted += (i + 1 - n_vis + (layer == 0)) if text_after else i + 1
            if layer == 0:  # the runtime computes the first visual row twice (ordinary attention
                score += first + 1  # overwrites the merge kernel's row there) and counts both
                weighted += first + 1
        extra = 4 * q * n + 8 * q * present if layer in ref.min_cos else 0  # the influence row
        total += n * per_token + 2 * q * (score + weighted) + extra
        dense += n0 * per_token + 2 * q * n0 * (n0 + 1)
    return total / dense


def _independent(model, prompts, cfg_dict):
    """Mean prefill FLOPs ratio (by hand) and first-token agreement (slow reference vs HF forward)."""
    cfg = visipruner.VisiPrunerConfig.from_dict(cfg_dict)
    ratios, agree = [], 0
    for inp in prompts:
        ref = reference_forward(model, inp["input_ids"], inp["pixel_values"], cfg)
        ratios.append(_hand_prefill_flops(model, inp["input_ids"], cfg, ref))
        agree += int(ref.logits[-1].argmax()) == int(model(**inp).logits[0, -1].argmax())
    return sum(ratios) / len(ratios), agree / len(prompts)


def test_calibrate_end_to_end_on_a_tiny_model():
    model = tiny_llava(0, layers=10)
    proc = FakeProcessor(model)
    res = calibrate(model, proc, [FakeQuestion(i) for i in range(4)], ("flops", 0.7),
                    [FakeQuestion(i) for i in range(4, 6)], variants=[(2, True), (2, False)],
                    finalists=2, refine=1, progress=False)
    assert res["candidates_scored"] > 10
    assert {v["shallow_stage"] for v in res["variants"]} == {True, False}
    strip = lambda f: {k: v for k, v in f.items() if k != "exit_by_reason"} | {  # noqa: E731
        "config": {k: v for k, v in f["config"].items() if k != "exit_by"}}
    assert res["finalists"] and strip(res["chosen"]) in [strip(f) for f in res["finalists"]]
    assert {f["round"] for f in res["finalists"]} <= {0, 1}
    # each finalist's rerun FLOPs and agreement, against numbers computed by another route: the
    # fake processor's prompt for question i is random_prompt(seed=i), its answer the first token
    calib = [random_prompt(model, seed=i, images=1) for i in range(4)]
    for f in res["finalists"]:
        flops, agreement = _independent(model, calib, f["config"])
        assert f["flops_ratio"] == pytest.approx(flops, rel=1e-9) and f["agreement"] == agreement, f["config"]
        assert f["examples"] == 4
    assert any(f["flops_ratio"] < 0.7 for f in res["finalists"]) and any(f["agreement"] < 1 for f in res["finalists"])
    # the flops target is checked on the held-out prompts with the real runtime
    h = res["heldout"]
    flops, agreement = _independent(model, [random_prompt(model, seed=i, images=1) for i in (4, 5)], res["chosen"]["config"])
    assert h["examples"] == 2 and h["flops_ratio"] == pytest.approx(flops, rel=1e-9) and h["agreement"] == agreement
    assert h["meets_target"] is (flops <= 0.7)
    cfg = visipruner.VisiPrunerConfig.from_dict(res["chosen"]["config"])
    assert cfg.to_dict() == res["chosen"]["config"]


def test_exit_by_is_chosen_only_where_it_changes_no_measured_decision():
    from visipruner.calibrate import choose_exit_by, parse_exit_by

    f = {"config": {"stages": ["middle", "deep"]}, "latest_exit": 6, "exit_rate": 1.0}
    assert choose_exit_by(f, "auto", 10)[0] == 7
    assert choose_exit_by({**f, "exit_rate": 0.9}, "auto", 10)[0] is None  # some prompt never exited
    assert choose_exit_by({**f, "latest_exit": None, "exit_rate": 0.0}, "auto", 10)[0] is None
    assert choose_exit_by({**f, "latest_exit": 9}, "auto", 10)[0] is None  # nothing to free
    assert choose_exit_by({**f, "config": {"stages": ["middle"]}}, "auto", 10)[0] is None
    assert choose_exit_by(f, "none", 10)[0] is None and choose_exit_by(f, "4", 10)[0] == 4
    assert parse_exit_by("auto") == "auto" and parse_exit_by("5") == "5"
    for bad in ("0", "-2", "late"):
        with pytest.raises(InputError, match="--exit-by"):
            parse_exit_by(bad)


def test_calibrate_sets_exit_by_and_its_figures_are_the_bounded_configs():
    """A given bound is measured again: the chosen config's figures are those of the config with the
    bound (checked by the reference); an automatic bound changes no calibration prompt's decision."""
    model = tiny_llava(0, layers=10)
    proc = FakeProcessor(model)
    calib = [random_prompt(model, seed=i, images=1) for i in range(4)]
    for how in ("3", "auto"):
        res = calibrate(model, proc, [FakeQuestion(i) for i in range(4)], ("flops", 0.7), variants=[(2, False)],
                        finalists=2, refine=0, progress=False, exit_by=how)
        ch = res["chosen"]
        if how == "3":
            assert ch["config"]["exit_by"] == 3 and ch["latest_exit"] is not None and ch["latest_exit"] <= 2
        bound = ch["config"].get("exit_by")
        flops, agreement = _independent(model, calib, ch["config"])
        assert ch["flops_ratio"] == pytest.approx(flops, rel=1e-9) and ch["agreement"] == agreement, (how, bound)
        assert visipruner.VisiPrunerConfig.from_dict(ch["config"]).exit_by == bound


def test_no_exit_candidates_predict_the_runtime():
    """The search also scores each fusion rule without the deep stage (exit threshold None in the
    grid): those candidates never exit, their predicted FLOPs are the runtime's, and an exit that
    fires (threshold -1: every layer after fusion counts as quiet) is cheaper and riskier."""
    from visipruner.calibrate import _grid

    L, K = 10, 2
    model = tiny_llava(1, layers=L)
    prompts = [random_prompt(model, seed=s, images=1 + s % 2) for s in range(3)]
    rec = record(model, prompts, K=K, progress=False, shallow=False)
    assert _grid(rec, False)[2][-1] is None
    dims = Dims.from_config(model.config.text_config)
    cands = score_candidates(rec, dims, [1.0], [0.0], [None, -1.0], [1, 2], relative=False, budgets=[0.25])
    none = [c for c in cands if "deep" not in c.config.stages]
    assert len(cands) == 6 and len(none) == 2  # 2 rules x (no exit + 2 patiences)
    for cand in none:
        flops = []
        for inp in prompts:
            with visipruner.apply(model, cand.config) as h:
                model(**inp)
            assert h.last_stats.fusion_layer == K + 1 and h.last_stats.exit_layer is None
            flops.append(h.last_stats.prefill_flops_ratio)
        assert cand.flops_ratio == pytest.approx(np.mean(flops), rel=1e-9)
        exiting = next(c for c in cands if "deep" in c.config.stages and c.config.exit_patience == 1
                       and c.config.keep_ratio == cand.config.keep_ratio)
        assert exiting.flops_ratio < cand.flops_ratio and exiting.risk > cand.risk
