"""VisiPruner's budget mode (keep_ratio / keep_tokens) and fusion fallback layer, against the slow
reference: the same decisions and logits, and the kept tokens are the budget's largest ||c_j||."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import visipruner
from visipruner import AttentionSelectConfig, VisiPrunerConfig
from visipruner.methods import Schedule
from visipruner.testing import IMAGE_TOKEN_ID, random_prompt, tiny_llava

from families import family
from reference import reference_forward

torch.set_grad_enabled(False)

K = 2


def _run(model, inputs, cfg, ref_kwargs=None, selection="influence"):
    ref = reference_forward(model, inputs["input_ids"], inputs.get("pixel_values"), cfg, selection=selection,
                            **(ref_kwargs or {}))
    with visipruner.apply(model, cfg) as h:
        out = model(**inputs).logits[0]
    s = h.last_stats
    torch.testing.assert_close(out, ref.logits[0] if ref.logits.dim() == 3 else ref.logits, atol=1e-5, rtol=0)
    assert (s.fusion_layer, s.exit_layer, s.critical_tokens) == (ref.fusion_layer, ref.exit_layer, ref.critical_tokens)
    assert s.visual_tokens_per_layer == ref.visual_tokens_per_layer
    return s, ref


def _check_top_norms(ref, kept, n_keep):
    """``kept`` is a set of ``n_keep`` visual ids whose recorded ||c_j|| at fusion are the largest."""
    norms = ref.norms[ref.fusion_layer]
    assert len(kept) == n_keep
    inside = norms[sorted(kept)]
    outside = norms[[j for j in range(len(norms)) if j not in set(kept)]]
    if len(outside):
        assert float(inside.min()) >= float(outside.max())


@pytest.mark.parametrize("seed", (0, 1))
@pytest.mark.parametrize("budget", [dict(keep_ratio=0.25), dict(keep_ratio=0.5), dict(keep_tokens=5)])
@pytest.mark.parametrize("stages", [("middle", "deep"), ("shallow", "middle", "deep")])
def test_budget_keeps_the_most_influential_tokens(seed, budget, stages):
    model = tiny_llava(seed)
    inputs = random_prompt(model, seed=seed, images=2 if seed else 1)
    n_vis = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    # tokens_threshold huge: a threshold would keep nothing, the budget must decide alone
    cfg = VisiPrunerConfig(stages=stages, shallow_layers=K, layer_threshold=1.0, tokens_threshold=1e9,
                           exit_threshold=0.0, exit_patience=2, **budget)
    s, ref = _run(model, inputs, cfg)
    n_keep = budget.get("keep_tokens") or math.ceil(budget["keep_ratio"] * n_vis)
    assert s.fusion_layer == K + 1 and s.exit_layer == K + 3
    _check_top_norms(ref, s.critical_tokens, n_keep)
    assert s.visual_tokens_per_layer[K + 2] == n_keep < n_vis
    # the relative score ranks tokens the same way: the same decisions
    rel, _ = _run(model, inputs, dataclasses.replace(cfg, relative_tokens_threshold=True))
    assert rel.critical_tokens == s.critical_tokens


def test_fallback_layer_fuses_when_the_threshold_does_not():
    model = tiny_llava(2)
    inputs = random_prompt(model, seed=2, images=1)
    n_vis = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    never = dict(stages=("middle", "deep"), shallow_layers=K, layer_threshold=-1.0, exit_threshold=1.0)
    s, _ = _run(model, inputs, VisiPrunerConfig(keep_ratio=0.3, **never))
    assert s.fusion_layer is None and set(s.visual_tokens_per_layer) == {n_vis}  # no fallback: nothing pruned
    s, ref = _run(model, inputs, VisiPrunerConfig(keep_ratio=0.3, fusion_fallback_layer=4, **never))
    assert s.fusion_layer == 4
    _check_top_norms(ref, s.critical_tokens, math.ceil(0.3 * n_vis))
    # threshold mode with a fallback: the critical set is the tokens over tokens_threshold at that layer
    probe = reference_forward(model, inputs["input_ids"], inputs["pixel_values"],
                              VisiPrunerConfig(stages=("middle",), shallow_layers=K, layer_threshold=-1.0))
    norms = probe.norms[5].sort().values
    thr = float(norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2
    s, ref = _run(model, inputs, VisiPrunerConfig(tokens_threshold=thr, fusion_fallback_layer=5, **never))
    assert s.fusion_layer == 5 and s.critical_tokens == sorted((probe.norms[5] > thr).nonzero().squeeze(-1).tolist())
    # a threshold that fires before the fallback layer wins
    s, _ = _run(model, inputs, VisiPrunerConfig(**{**never, "layer_threshold": 1.0}, keep_tokens=3,
                                                fusion_fallback_layer=6))
    assert s.fusion_layer == K + 1 and len(s.critical_tokens) == 3


def test_exit_by_bounds_the_vision_exit():
    """``exit_by``: no visual token in layers >= exit_by, whatever the thresholds; a threshold exit that
    fires earlier wins; the bound overrides a forced schedule's later exit too."""
    model = tiny_llava(2)
    inputs = random_prompt(model, seed=2, images=1)
    n_vis = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    never = dict(stages=("middle", "deep"), shallow_layers=K, layer_threshold=-1.0, exit_threshold=1.0)
    s, _ = _run(model, inputs, VisiPrunerConfig(exit_by=5, **never))  # nothing fires: the bound alone
    assert (s.fusion_layer, s.exit_layer) == (None, 4)
    assert s.visual_tokens_per_layer == [n_vis] * 5 + [0] * (len(s.visual_tokens_per_layer) - 5)
    s, _ = _run(model, inputs, VisiPrunerConfig(exit_by=6, keep_tokens=3, fusion_fallback_layer=3, **never))
    assert (s.fusion_layer, s.exit_layer) == (3, 5) and s.visual_tokens_per_layer[4:7] == [3, 3, 0]
    early = dict(never, layer_threshold=1.0, exit_threshold=0.0, exit_patience=1, keep_tokens=3)  # exit K+2
    s, _ = _run(model, inputs, VisiPrunerConfig(exit_by=7, **early))
    assert (s.fusion_layer, s.exit_layer) == (K + 1, K + 2)
    sched = Schedule(fusion_layer=3, critical_tokens=[0, 1], exit_layer=6)
    ref = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], VisiPrunerConfig(exit_by=5, **never),
                            schedule=sched)
    with visipruner.apply(model, VisiPrunerConfig(exit_by=5, **never), schedule=sched) as h:
        out = model(**inputs).logits[0]
    torch.testing.assert_close(out, ref.logits, atol=1e-5, rtol=0)
    assert h.last_stats.exit_layer == ref.exit_layer == 4 and h.last_stats.visual_tokens_per_layer[5] == 0
    with pytest.raises(ValueError, match="exit_by"):
        VisiPrunerConfig(exit_by=0)
    with pytest.raises(ValueError, match="add 'deep'"):
        VisiPrunerConfig(stages=("middle",), exit_by=4)


def test_budget_larger_than_the_prompt_keeps_every_token_and_attention_selection_budgets_too():
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0, images=1)
    n_vis = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    base = dict(stages=("middle",), shallow_layers=K, layer_threshold=1.0)
    s, _ = _run(model, inputs, VisiPrunerConfig(keep_tokens=n_vis + 10, **base))
    assert s.critical_tokens == list(range(n_vis))
    s, _ = _run(model, inputs, VisiPrunerConfig(keep_ratio=1.0, **base))
    assert s.critical_tokens == list(range(n_vis))
    s, _ = _run(model, inputs, AttentionSelectConfig(keep_tokens=4, **base), selection="attention")
    assert len(s.critical_tokens) == 4


def test_budget_on_an_mrope_family():
    fam = family("qwen2_vl")
    model = fam.build(0, "sdpa", 8)
    inputs, spans = fam.prompt(model, 0, "two")
    cfg = VisiPrunerConfig(stages=("middle", "deep"), shallow_layers=K, layer_threshold=-1.0, exit_threshold=0.0,
                           exit_patience=2, keep_ratio=0.2, fusion_fallback_layer=4)
    s, ref = _run(model, inputs, cfg, dict(extra_inputs=fam.reference_inputs(inputs), spans=spans))
    n_vis = ref.visual_tokens_per_layer[0]
    assert s.fusion_layer == 4 and s.exit_layer == 6
    _check_top_norms(ref, s.critical_tokens, math.ceil(0.2 * n_vis))


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep_ratio=0.2, keep_tokens=10), "not both"),
    (dict(keep_ratio=0.0), "keep_ratio"),
    (dict(keep_ratio=1.5), "keep_ratio"),
    (dict(keep_tokens=0), "keep_tokens"),
    (dict(keep_tokens=2.5), "keep_tokens"),
    (dict(fusion_fallback_layer=2, shallow_layers=2), "fusion_fallback_layer"),
    (dict(keep_ratio=0.2, stages=("shallow", "deep")), "add 'middle'"),
])
def test_bad_budgets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisiPrunerConfig(**kwargs)


def test_budget_round_trips_through_json():
    cfg = VisiPrunerConfig(keep_ratio=0.11, fusion_fallback_layer=9)
    assert visipruner.config_from_json(cfg.to_json()) == cfg
    assert cfg.budget(576) == 64 and VisiPrunerConfig(keep_ratio=0.1).budget(30) == 3
    assert VisiPrunerConfig(keep_tokens=64).budget(10) == 10 and VisiPrunerConfig().budget(576) is None


def test_diversity_experiment_is_the_greedy_log_det_set():
    """scripts/diverse_variant.py (the experiment docs/calibrate.md reports): its incremental
    Cholesky picks, step by step, the token that most increases log det L_S, checked by brute force."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    from diverse_variant import greedy_dpp

    g = torch.Generator().manual_seed(0)
    q, x = torch.rand(12, generator=g) + 0.1, torch.randn(12, 6, generator=g)
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    L = q.double()[:, None] * (xn @ xn.T) * q.double()[None]
    chosen = []
    for _ in range(5):
        chosen.append(max((j for j in range(12) if j not in chosen),
                          key=lambda j: float(torch.logdet(L[chosen + [j]][:, chosen + [j]]))))
    assert greedy_dpp(q, x, 5).tolist() == chosen
    # past the kernel's rank (6) the rest comes by influence
    rest = greedy_dpp(q, x, 12).tolist()
    assert sorted(rest) == list(range(12)) and rest[:5] == chosen


@pytest.mark.parametrize("selector", ("cdpruner", "divprune"))
def test_input_set_experiment_keeps_the_peers_choice_at_fusion(selector):
    """scripts/input_set_variant.py (docs/calibrate.md, "Selection or timing"): every visual token
    stays until VisiPruner's fusion layer, and from there exactly the tokens the peer itself keeps at
    layer 0 of the same prompt; budget mode at the same schedule keeps other tokens."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    from input_set_variant import InputSetVisiPrunerConfig

    from visipruner.methods import CDPrunerConfig, DivPruneConfig

    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0)
    n_vis = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    # the peer's own choice, from the layer-0 input of an unpruned forward (visual rows; the text after the
    # first visual token as the instruction), computed here independently of the runtime
    seen = {}

    def grab(mod, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"])[0])

    hook = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    model(**inputs)
    hook.remove()
    ids = inputs["input_ids"][0]
    is_vis = ids == IMAGE_TOKEN_ID
    after = ~is_vis & (torch.arange(len(ids)) > int(is_vis.nonzero()[0]))
    method = {"cdpruner": CDPrunerConfig, "divprune": DivPruneConfig}[selector](keep_tokens=5).build()
    expected = sorted(method.select(seen["h"][is_vis].float(), seen["h"][after].float()).tolist())
    cfg = InputSetVisiPrunerConfig(stages=("middle",), shallow_layers=K, layer_threshold=-1.0, tokens_threshold=0.0,
                                   fusion_fallback_layer=K + 2, keep_tokens=5, selector=selector)
    with visipruner.apply(model, cfg) as h:
        model(**inputs)
    s = h.last_stats
    layers = len(s.visual_tokens_per_layer)
    assert s.fusion_layer == K + 2
    assert s.visual_tokens_per_layer == [n_vis] * (K + 3) + [5] * (layers - K - 3)
    assert sorted(s.critical_tokens) == expected
    # plain budget mode, same schedule: the largest ||c_j||, another set here
    plain = VisiPrunerConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(VisiPrunerConfig)})
    with visipruner.apply(model, plain) as h:
        model(**inputs)
    assert h.last_stats.fusion_layer == K + 2 and sorted(h.last_stats.critical_tokens) != expected
    with pytest.raises(ValueError, match="budget"):
        InputSetVisiPrunerConfig(selector=selector)
