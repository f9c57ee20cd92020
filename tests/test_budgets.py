"""`bench --budgets`: every method at fixed token budgets, % of the unpruned accuracy with intervals."""

from __future__ import annotations

import pytest
import torch

from visipruner import VisiPrunerConfig
from visipruner.budgets import budget_configs, plot_budgets, print_budget_table, retained, run_budgets
from visipruner.testing import tiny_llava

from fakes import FakeProcessor, FakeQuestion

torch.set_grad_enabled(False)
METHODS = ("fastv", "pdrop", "vtw", "dart", "visionzip", "sparsevlm", "cdpruner", "divprune", "random", "visipruner")


def test_retained_is_the_accuracy_ratio_with_a_paired_interval():
    pct, (lo, hi) = retained([1, 1, 0, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 1, 1, 0])
    assert pct == pytest.approx(100 * 6 / 6)
    assert lo <= pct <= hi and lo < 100 < hi or (lo, hi) == (100.0, 100.0) or lo <= 100 <= hi
    pct, (lo, hi) = retained([1, 0, 0, 0] * 5, [1, 1, 1, 1] * 5)
    assert pct == pytest.approx(25.0) and lo < 25.0 < hi and hi < 60
    with pytest.raises(ValueError, match="unpruned model answered no question"):
        retained([1, 0], [0, 0])


def test_budgets_flag_takes_fractions_in_range():
    from visipruner.bench import _budgets

    assert _budgets("0.11, 0.22,0.33") == (0.11, 0.22, 0.33)
    for bad in ("0,0.2", "0.2,1.5", "a,b", ""):
        with pytest.raises(SystemExit, match="--budgets"):
            _budgets(bad)


@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_every_method_keeps_its_budget_when_run(budget):
    """Each method's budget config, run: its average visual tokens per layer is the budget (within a
    layer's share for methods acting inside the model; exactly ceil(b * n) before it)."""
    import visipruner
    from visipruner.testing import random_prompt

    model = tiny_llava(0, layers=16, image_size=64)  # 64 visual tokens
    inputs = random_prompt(model, seed=0)
    cfgs = budget_configs(16, budget, VisiPrunerConfig(shallow_layers=2), METHODS)
    assert {"cdpruner", "divprune", "fastv", "visionzip"} <= set(cfgs) and "attention" not in cfgs
    for name, cfg in cfgs.items():
        with visipruner.apply(model, cfg) as h:
            model(**inputs)
        measured = h.last_stats.avg_visual_tokens / 64
        if name in ("cdpruner", "divprune"):  # before the language model: the budget at every layer
            assert h.last_stats.visual_tokens_per_layer == [int(64 * budget)] * 16, name
        elif name == "visipruner":  # budget mode: the budget's tokens from fusion (threshold or fallback) on
            assert cfg.keep_ratio == budget and cfg.fusion_fallback_layer == 8
            fusion = h.last_stats.fusion_layer
            assert fusion is not None and h.last_stats.visual_tokens_per_layer[fusion + 1] == int(64 * budget)
        else:
            assert measured == pytest.approx(budget, abs=1 / 16 + 1 / 64), name


def test_run_budgets_end_to_end_on_a_tiny_model(tmp_path, capsys):
    from visipruner.bench import answer_all

    model = tiny_llava(0, layers=8, image_size=64)
    processor = FakeProcessor(model)
    questions = [FakeQuestion(i) for i in range(4)]
    for q, r in zip(questions, answer_all(model, processor, questions, None, 2, "unpruned")):
        q.answer = r["prediction"]  # the unpruned model is right on every question: % retained is defined
    rows = run_budgets(model, processor, questions, VisiPrunerConfig(shallow_layers=2), ("fastv", "cdpruner", "divprune"),
                       budgets=(0.25, 0.5), max_new_tokens=2)
    un = rows[0]
    assert un["method"] == "unpruned" and un["accuracy"] == 1.0 and un["retained_pct"] == 100.0
    assert {(r["method"], r["budget"]) for r in rows[1:]} == {(m, b) for m in ("fastv", "cdpruner", "divprune")
                                                           for b in (0.25, 0.5)}
    for r in rows[1:]:
        assert r["retained_pct"] == pytest.approx(100 * r["accuracy"])  # unpruned accuracy is 1
        lo, hi = r["retained_ci"]
        assert lo <= r["retained_pct"] <= hi
        assert r["prefill_flops_ratio"] < 1.0
    print_budget_table(rows)
    out = capsys.readouterr().out
    assert "25% tokens" in out and "50% tokens" in out and "cdpruner" in out
    agreement = out.split("agreement with the unpruned answers, %")[1].splitlines()[1:]
    for r in rows[1:]:  # gold-scored: each row's agreement printed in its own block
        line = next(x for x in agreement if x.split()[0] == r["method"])
        assert f"{100 * r['agreement']:.1f}" in line
    plot_budgets(rows, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_questions_without_gold_answers_are_scored_by_agreement_with_the_unpruned_model(tmp_path, capsys):
    """Real photos have no gold answer: % retained is then the agreement with the unpruned answers
    (chosen automatically), recomputed here from the records, and the table and plot say so."""
    from visipruner.bench import answer_all
    from visipruner.budgets import score_of
    from visipruner.data.photos import ANSWER
    model = tiny_llava(0, layers=8, image_size=64)
    processor = FakeProcessor(model)
    questions = [FakeQuestion(i) for i in range(6)]
    for q in questions:
        q.answer = ANSWER
    assert score_of(questions) == "agreement" and score_of(questions, "gold") == "gold"
    with pytest.raises(ValueError, match="score"):
        score_of(questions, "bleu")
    base = answer_all(model, processor, questions, None, 2, "unpruned")
    rows = run_budgets(model, processor, questions, VisiPrunerConfig(shallow_layers=2), ("fastv", "random"),
                       budgets=(0.1,), max_new_tokens=2, unpruned_records=base)
    assert rows[0]["score"] == "agreement" and rows[0]["accuracy"] == 0.0  # no question is "right" by gold
    for r in rows[1:]:
        assert r["score"] == "agreement" and r["retained_pct"] == pytest.approx(100 * r["agreement"])
    assert any(r["retained_pct"] < 100 for r in rows[1:])  # 10% of the tokens changes some tiny-model answers
    # gold scoring of the same questions: the unpruned model is never right, so % retained is undefined
    with pytest.raises(ValueError, match="unpruned model answered no question"):
        run_budgets(model, processor, questions, VisiPrunerConfig(shallow_layers=2), ("fastv",), budgets=(0.1,),
                    max_new_tokens=2, unpruned_records=base, score="gold")
    print_budget_table(rows)
    assert "agreement with the unpruned answers" in capsys.readouterr().out
    plot_budgets(rows, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").stat().st_size > 1000


@pytest.mark.parametrize("make,layer", [("FastVConfig", 2), ("DARTConfig", 2), ("RandomConfig", 2),
                                        ("CDPrunerConfig", None), ("DivPruneConfig", None)])
def test_keep_tokens_is_the_count_kept_and_excludes_keep_ratio(make, layer):
    import visipruner
    from visipruner.testing import random_prompt

    cls = getattr(visipruner, make)
    with pytest.raises(ValueError, match="not both"):
        cls(keep_ratio=0.3, keep_tokens=10)
    with pytest.raises(ValueError, match="keep_ratio"):
        cls(keep_ratio=1.2)
    with pytest.raises(ValueError, match="keep_tokens"):
        cls(keep_tokens=-1)
    assert cls().keep_ratio is not None and cls(keep_tokens=5).keep_ratio is None  # the published default
    model = tiny_llava(0, layers=6, image_size=64)  # 64 visual tokens
    with visipruner.apply(model, cls(keep_tokens=10)) as h:
        model(**random_prompt(model, seed=1))
    after = h.last_stats.visual_tokens_per_layer[(layer or -1) + 1]
    assert after == 10 and h.last_stats.visual_tokens_per_layer[-1] == 10
    cfg = cls(keep_tokens=10)
    assert visipruner.config_from_json(cfg.to_json()) == cfg


def test_plot_legend_says_when_a_method_keeps_more_than_its_budget():
    """Points sit at the budget; a method that kept a different share of the tokens (VisiPruner keeps
    every token until fusion) says what it kept in its legend label, the others are named plainly."""
    from visipruner.budgets import _legend_label

    rows = [{"method": "fastv", "budget": b, "avg_visual_fraction": b + 0.003} for b in (0.11, 0.22)]
    rows += [{"method": "visipruner", "budget": b, "avg_visual_fraction": f} for b, f in ((0.11, 0.315), (0.22, 0.391))]
    rows += [{"method": "pdrop", "budget": b, "avg_visual_fraction": 0.30} for b in (0.11, 0.22)]
    assert _legend_label("fastv", rows) == "fastv"
    assert _legend_label("visipruner", rows) == "visipruner (keeps 0.32-0.39)"
    assert _legend_label("pdrop", rows) == "pdrop (keeps 0.30)"
