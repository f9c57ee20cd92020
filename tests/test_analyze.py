"""`visipruner analyze` on tiny random LLaVAs (no processor: pre-built inputs + answer token ids)."""

from __future__ import annotations

import json

import pytest
import torch

import visipruner
from visipruner import cli
from visipruner.analyze import (
    Example,
    analyze,
    answer_logprob,
    block_attention,
    noise_rows,
    text_queries,
    windows,
)
from visipruner.testing import IMAGE_TOKEN_ID, random_prompt, tiny_llava

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(0, layers=8)


def _logits(model, inp):
    return model(**inp, use_cache=False).logits[0]


def test_knockout_all_layers_changes_logprobs_and_an_empty_window_does_not(model):
    inp = random_prompt(model, seed=1)
    tq, vis = text_queries(inp["input_ids"], IMAGE_TOKEN_ID)
    base = answer_logprob(model, inp, 7)[0]
    with block_attention(model, [], tq, vis):
        assert answer_logprob(model, inp, 7)[0] == base
    with block_attention(model, range(8), tq, vis):
        assert abs(answer_logprob(model, inp, 7)[0] - base) > 1e-4
    assert answer_logprob(model, inp, 7)[0] == base  # hooks removed


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_knockout_is_true_blocking(attn):
    """Mask-based knockout in layers 1..L-1 + VisiPruner's layer-0 merge == the runtime's
    renormalising shallow stage over every layer (visual keys dropped from text queries)."""
    model = tiny_llava(1, layers=4, attn_implementation=attn)
    inp = random_prompt(model, seed=2, images=2)
    tq, vis = text_queries(inp["input_ids"], IMAGE_TOKEN_ID)
    with visipruner.apply(model, visipruner.VisiPrunerConfig(stages=("shallow",), shallow_layers=4,
                                                             shallow_renormalise=True)):
        want = _logits(model, inp)
    merge_only = visipruner.VisiPrunerConfig(stages=("shallow",), shallow_layers=1)
    with visipruner.apply(model, merge_only), block_attention(model, range(1, 4), tq, vis):
        got = _logits(model, inp)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(model, inp), want, atol=1e-4)


def test_noise_rows_only_touches_later_layers(model):
    inp = random_prompt(model, seed=3)
    base = _logits(model, inp)
    pos = (inp["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().squeeze(-1)[:3].tolist()
    with noise_rows(model, 5, pos):
        out = _logits(model, inp)
    first_vis = pos[0]
    torch.testing.assert_close(out[:first_vis], base[:first_vis])  # causal: rows before are untouched
    assert not torch.allclose(out[-1], base[-1], atol=1e-5)


def test_windows_cover_depth():
    assert windows(8, 1) == [(i, i + 1) for i in range(8)]
    assert windows(30, 3, stride=4)[-1] == (27, 30)
    assert windows(4, 9) == [(0, 4)]


def test_analyze_writes_json_png_html_and_a_config(model, tmp_path):
    exs = [Example(inputs=random_prompt(model, seed=s, images=1 + (s == 2)), gold_id=10 + s, id=f"ex{s}")
           for s in range(3)]
    cfg = visipruner.VisiPrunerConfig(shallow_layers=2, layer_threshold=0.9999, tokens_threshold=0.05)
    s = analyze(model, None, None, tmp_path, config=cfg, examples=exs, progress=False)
    d = json.loads((tmp_path / "analysis.json").read_text(),
                   parse_constant=lambda c: pytest.fail(f"non-JSON number {c}"))
    assert len(d["examples"]) == 3 and d["summary"]["examples"] == 3
    assert d["summary"]["window"] == 1 and len(d["summary"]["knockout"]) == 8
    assert d["summary"]["knockout_all"]["delta_logp"]["mean"] != 0
    assert set(s["sink_test"]) == {"block_topk_sinks", "block_k_random_others", "block_all_visual", "visipruner_merge"}
    assert all(len(r["logit_lens"]["residual_top"]) == 8 for r in d["examples"])
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert {"knockout.png", "influence.png", "sink_attribution.png", "lens_values.png", "heatmap_0.png"} <= set(pngs)
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "<img src=\"knockout.png\"" not in page and "Verdicts" in page
    words = {"yes": "APPEARS", "no": "DOES NOT APPEAR", "inconclusive": "INCONCLUSIVE"}
    heads = {"shallow": "Shallow stage (K=2): ", "middle": "Middle stage: ", "deep": "Deep stage: "}
    for stage, head in heads.items():  # each verdict opens with exactly its measured outcome
        assert s["outcomes"][stage] in words
        assert s["verdicts"][stage].startswith(head + words[s["outcomes"][stage]] + ". ")
    for key in ("knockout", "visipruner_shallow_stage"):  # VisiPruner's own shallow stage beside the knockout
        d = s["shallow_cost"][key]["delta_logp"]
        assert d["n"] == 3 and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert "the knockout beside VisiPruner's own shallow stage" in page
    text = (tmp_path / "suggested_config.json").read_text()
    sug = visipruner.VisiPrunerConfig.from_json(text)
    assert visipruner.VisiPrunerConfig.from_json(sug.to_json()) == sug
    assert sug.to_dict() == s["suggestion"]["config"]


def test_bad_data_and_unsupported_model_give_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    (tmp_path / "x.png").write_bytes(b"")
    bad.write_text('{"image": "x.png", "question": "q?", "answer": "a"}\n{not json\n')
    rc = cli.main(["analyze", "--data", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad question file" in err and "bad.jsonl:2: invalid JSON" in err
    with pytest.raises(TypeError, match="does not support model class Linear"):
        analyze(torch.nn.Linear(2, 2), None, None, tmp_path / "o", examples=[])
    with pytest.raises(ValueError, match="no examples"):
        analyze(tiny_llava(0, layers=2), None, None, tmp_path / "o", examples=[],
                config=visipruner.VisiPrunerConfig(shallow_layers=1))


def test_suggestion_takes_the_tightest_bound():
    from visipruner.analyze import suggest

    def c(d, L=None, start=None):
        st = {"mean": d, "median": d, "q25": d, "q75": d, "n": 1}
        out = {"delta_logp": st, "matters": d < -0.1}
        return {**out, "layers": L} if L is not None else {**out, "start": start, "end": start + 2}

    none = {"n": 0, "mean": None, "median": None, "q25": None, "q75": None}
    s = {"num_layers": 12, "window": 2, "tolerance_nats": 0.1, "knockout_all": c(-2.0, L=12),
         "knockout_prefix": [c(0.0, L=j) for j in (1, 2, 4, 6)] + [c(-1.0, L=8), c(0.0, L=10)],
         "knockout": [c(-1.0 if s0 in (7, 8) else 0.0, start=s0) for s0 in range(11)],
         "fusion_layer": {**none, "median": 5.0, "n": 4}, "exit_layer": none, "fusion_rate": 1.0, "exit_rate": 0.0,
         "min_cos": [none] * 12}
    cfg = visipruner.VisiPrunerConfig(shallow_layers=2)
    assert suggest(s, cfg)["shallow_layers"] == 4  # joint knockout allows 6, fusion at 5 allows 4
    s["fusion_layer"] = none
    assert suggest(s, cfg)["shallow_layers"] == 6
    s["knockout_prefix"][0] = c(-1.0, L=1)  # layer 0 alone matters: no shallow stage
    assert "shallow" not in suggest(s, cfg)["config"]["stages"]
    s["knockout_all"] = c(0.0, L=12)  # the image is not used at all: nothing to locate
    assert suggest(s, cfg)["shallow_layers"] == 2


# ------------------------------------------------------------------------------ verdicts
def test_bootstrap_interval_of_the_mean():
    from visipruner.analyze import bootstrap_ci

    assert bootstrap_ci([]) is None
    assert bootstrap_ci([0.25] * 7) == [0.25, 0.25]  # no spread, nothing to be unsure about
    wide = bootstrap_ci([-1.0, 1.0] * 5)
    narrow = bootstrap_ci([-1.0, 1.0] * 200)
    assert -1.0 < wide[0] < -0.2 and 0.2 < wide[1] < 1.0  # 10 examples: the mean 0 is far from pinned down
    assert -0.15 < narrow[0] < 0 < narrow[1] < 0.15  # 400: sd/sqrt(n) = 0.05, so about ±0.1
    assert bootstrap_ci([-1.0, 1.0] * 5) == wide  # seeded: the report does not change from run to run


def _effects(deltas):
    from visipruner.analyze import _cond_summary

    return _cond_summary([{"delta_logp": d, "correct": None, "same_top": d > -0.5} for d in deltas])


def _summary(*, knockout=(0.0,) * 10, own=(0.0,) * 10, fused=10, critical=(-1.2,) * 10, random=(0.0,) * 10,
             keep=(0.0,) * 10, exited=10, late=(0.0,) * 10):
    """A summary with the fields verdicts() reads; 10 examples, K = 2, 12 layers, tolerance 0.1."""
    from visipruner.analyze import bootstrap_ci

    zero = _effects([0.0] * 10)
    stat = {"n": 10, "mean": 1.0, "median": 1.0, "q25": 1.0, "q75": 1.0}
    windows = [{**(_effects(late) if start > 8 else zero), "start": start, "end": start + 2} for start in range(0, 11)]
    diff = [c - r for c, r in zip(critical, random)]
    return {
        "examples": 10, "num_layers": 12, "tolerance_nats": 0.1, "unpruned": zero, "knockout_all": _effects([-1.5] * 10),
        "shallow_cost": {"layers": 2, "knockout": _effects(knockout), "visipruner_shallow_stage": _effects(own)},
        "sink_test": {"block_topk_sinks": zero}, "knockout": windows,
        "value_l1": {"sinks": [stat] * 12, "other_visual": [stat] * 12}, "sink_attention_share": stat,
        "fusion_rate": fused / 10, "fusion_rate_ci95": bootstrap_ci([1.0] * fused + [0.0] * (10 - fused)),
        "fusion_layer": {**stat, "median": 5.0},
        "exit_rate": exited / 10, "exit_rate_ci95": bootstrap_ci([1.0] * exited + [0.0] * (10 - exited)),
        "exit_layer": {**stat, "median": 8.0 if exited else None},
        "attribution": {"remove_critical": _effects(critical), "remove_random_others": _effects(random),
                        "keep_only_critical": _effects(keep), "noise_critical": _effects(critical),
                        "critical_minus_random": {"mean": sum(diff) / 10, "ci95": bootstrap_ci(diff)}},
        "config_run": {**zero, "prefill_flops_ratio": {**stat, "mean": 0.6}},
    }


# The shipped weights' own numbers for the shallow knockout (docs/results/analysis, 10 examples):
# mean -0.105 against a tolerance of 0.1, median -0.0006; VisiPruner's shallow stage +0.011.
SHIPPED_KNOCKOUT = (0.0014, -0.0002, -0.0394, -0.3204, -0.6940, -0.0096, -0.0001, -0.0009, -0.0001, 0.0101)
SHIPPED_OWN = (0.0024, 0.0003, 0.0162, -0.0084, 0.0074, 0.0868, -0.0002, -0.0001, 0.0004, 0.0046)


@pytest.mark.parametrize("stage, kwargs, outcome", [
    ("shallow", {}, "yes"),
    ("shallow", {"knockout": (-0.5,) * 10}, "no"),
    ("shallow", {"own": (-0.3, -0.4) * 5}, "no"),  # the knockout is harmless, VisiPruner's own stage is not
    ("shallow", {"knockout": SHIPPED_KNOCKOUT, "own": SHIPPED_OWN}, "inconclusive"),
    ("shallow", {"knockout": (-0.3, 0.1) * 5}, "inconclusive"),  # mean -0.1, right at the tolerance
    ("middle", {}, "yes"),
    ("middle", {"fused": 1}, "no"),  # fusion rarely triggers
    ("middle", {"fused": 5}, "inconclusive"),  # half the examples: the rate's interval straddles 50%
    ("middle", {"critical": (0.0,) * 10}, "no"),  # removing the critical tokens is as harmless as random ones
    ("middle", {"critical": (-0.6, 0.3) * 5}, "inconclusive"),  # -0.15 on average, but half the time +0.3
    ("middle", {"keep": (-1.0,) * 10}, "no"),  # keeping only the critical tokens costs a lot
    ("deep", {}, "yes"),
    ("deep", {"exited": 0}, "no"),
    ("deep", {"exited": 3}, "inconclusive"),  # 30% of 10 examples: the interval reaches past 50%
    ("deep", {"late": (-1.0,) * 10}, "no"),  # knocking vision out after the exit layer still costs
    ("deep", {"late": (-0.6, 0.3) * 5}, "inconclusive"),
])
def test_verdicts_say_inconclusive_when_the_interval_straddles_the_tolerance(stage, kwargs, outcome):
    from visipruner.analyze import verdicts

    texts, outcomes = verdicts(_summary(**kwargs), visipruner.VisiPrunerConfig(shallow_layers=2))
    assert outcomes[stage] == outcome
    head = {"shallow": "Shallow stage (K=2): ", "middle": "Middle stage: ", "deep": "Deep stage: "}[stage]
    word = {"yes": "APPEARS", "no": "DOES NOT APPEAR", "inconclusive": "INCONCLUSIVE"}[outcome]
    assert texts[stage].startswith(f"{head}{word}. "), texts[stage]
    others = {k: v for k, v in outcomes.items() if k not in (stage, "attribution")}
    assert others == {"vision_used": "yes", **{k: "yes" for k in ("shallow", "middle", "deep") if k != stage}}


def test_shallow_verdict_quotes_both_costs_with_their_intervals():
    from visipruner.analyze import verdicts

    texts, _ = verdicts(_summary(knockout=SHIPPED_KNOCKOUT, own=SHIPPED_OWN), visipruner.VisiPrunerConfig(shallow_layers=2))
    t = texts["shallow"]
    assert "layers 0..1: -0.105 [" in t and "VisiPruner's own shallow stage (layer-0 merge, then zeroing): +0.011 [" in t


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl", "gemma3"])
def test_analyze_runs_on_other_families(name, tmp_path):
    """The analysis reads visual tokens through the family's adapter (video tokens too) and runs
    every measurement on families with M-RoPE, deepstack, bidirectional images and sliding windows."""
    from families import family

    fam = family(name)
    model = fam.build(0, "sdpa", 6)
    exs = [Example(inputs=fam.prompt(model, s, fam.layouts[-1])[0], gold_id=10 + s, id=f"ex{s}") for s in range(2)]
    cfg = visipruner.VisiPrunerConfig(shallow_layers=2, layer_threshold=0.9999, tokens_threshold=0.05)
    s = analyze(model, None, None, tmp_path, config=cfg, examples=exs, progress=False)
    d = json.loads((tmp_path / "analysis.json").read_text())
    assert len(d["examples"]) == 2 and len(d["summary"]["knockout"]) == 6
    assert set(s["outcomes"]) >= {"shallow", "middle", "deep"}
    assert (tmp_path / "report.html").exists()
