"""Budget matching and the bench's summary arithmetic (the full bench runs on the embedded model)."""

from __future__ import annotations

import pytest
import torch

import visipruner
from visipruner import VisiPrunerConfig, VTWConfig
from visipruner.bench import _avg_fraction_layer_drop, matched_configs
from visipruner.testing import random_prompt, tiny_llava

from fakes import FakeProcessor, FakeQuestion

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
    for name in ("fastv", "pdrop", "dart", "random", "vtw", "visionzip", "sparsevlm"):
        with visipruner.apply(model, cfgs[name]) as h:
            model(**inputs)
        measured = h.last_stats.avg_visual_tokens / n_vis
        # token counts are whole numbers (ceil) and VTW's layer is an integer: within one layer's share
        assert measured == pytest.approx(fraction, abs=1 / 16 + 1 / n_vis), name


def test_run_bench_end_to_end_on_a_tiny_model(tmp_path):
    from visipruner.bench import PEERS, plot_pareto, run_bench

    model = tiny_llava(0, layers=8, image_size=64)
    rows = run_bench(model, FakeProcessor(model), [FakeQuestion(i) for i in range(2)],
                     VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=0.0, exit_threshold=0.0),
                     timing_prompts=1, repeats=1, decode_steps=2, max_new_tokens=2)
    methods = {r["method"] for r in rows}
    assert methods == {"unpruned", "visipruner", *PEERS}
    assert {r["setting"] for r in rows if r["method"] == "fastv"} == {"default", "matched"}
    keys = {"method", "config", "accuracy", "agreement", "avg_visual_tokens", "prefill_flops_ratio",
            "prefill_latency_ratio", "decode_ms_per_token", "kv_cache_bytes"}
    for r in rows:
        assert keys <= set(r), r["method"]
        assert 0 <= r["agreement"] <= 1 and r["prefill_latency_ratio"] > 0
    un = next(r for r in rows if r["method"] == "unpruned")
    vp = next(r for r in rows if r["method"] == "visipruner")
    assert un["agreement"] == 1.0 and un["prefill_flops_ratio"] == 1.0
    assert vp["prefill_flops_ratio"] < 1.0 and vp["kv_cache_bytes"] < un["kv_cache_bytes"]
    # FLOPs of exactly the timed prompts, and the per-layer time model's prediction, next to the times
    assert len(un["layer_time_fit_s"]) == 3
    assert 0 < vp["timed_prefill_flops_ratio"] < 1.0 and vp["realised_over_predicted_speedup"] > 0
    for r in rows:
        if r["method"] not in ("unpruned", "visionzip"):
            assert r["modelled_latency_ratio"] > 0 and r["realised_over_modelled_speedup"] > 0, r["method"]
    plot_pareto(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def organism():
    from visipruner.models import load_organism

    return load_organism()


def _direct_answers(model, processor, questions, config=None, max_new_tokens=6):
    """Greedy answers computed here, without the bench's helpers: chat template, processor, generate."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for q in questions:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}]
        inp = processor(images=[q.load_image()], text=[processor.apply_chat_template(msgs, add_generation_prompt=True)],
                        return_tensors="pt")
        with visipruner.apply(model, config) if config is not None else torch.no_grad():
            seq = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
        out.append(tok.decode(seq[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def test_bench_accuracy_and_agreement_match_answers_computed_directly(organism, tmp_path):
    """The embedded model and its real tokenizer: the bench's per-question predictions (``answer_all``)
    and its accuracy and agreement (``summarise``, as ``run_bench`` computes them without the timing)
    equal those of greedy answers generated here for the same questions."""
    from visipruner.bench import Setting, answer_all, summarise
    from visipruner.data import scenes
    from visipruner.data.questions import load_questions
    from visipruner.evaluate import normalize_answer

    model, processor = organism
    questions = load_questions(scenes.write_split(str(tmp_path), "validation", n=4, seed=0, start=6000))
    gold = [normalize_answer(q.answer) for q in questions]
    vtw = VTWConfig()  # drops the image after layer 3 of 30: changes answers
    unpruned_recs = answer_all(model, processor, questions, None, 6, "unpruned")
    unpruned = [normalize_answer(a) for a in _direct_answers(model, processor, questions)]
    for config in (None, vtw):
        direct = _direct_answers(model, processor, questions, config)
        answers = [normalize_answer(a) for a in direct]
        recs = unpruned_recs if config is None else answer_all(model, processor, questions, config, 6, "vtw")
        assert [r["prediction"] for r in recs] == direct
        assert [r["correct"] for r in recs] == [a == g for a, g in zip(answers, gold)]
        row = summarise(Setting("m", "default", config, recs), None if config is None else unpruned_recs, {})
        assert row["n"] == len(questions)
        assert row["accuracy"] == sum(a == g for a, g in zip(answers, gold)) / len(questions)
        assert row["agreement"] == sum(a == u for a, u in zip(answers, unpruned)) / len(questions)
        if config is None:
            assert row["accuracy"] >= 0.75  # the unpruned model answers these
        else:  # the check can fail: pruning changed answers
            assert row["agreement"] < 1.0
