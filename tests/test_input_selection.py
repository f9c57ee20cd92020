"""CDPruner and DivPrune: their selections against slow references written from the papers, and
their removal before the language model against an explicit-removal reference on every family."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import visipruner
from visipruner import CDPrunerConfig, DivPruneConfig, VisiPrunerConfig
from visipruner.methods.cdpruner import greedy_dpp_map
from visipruner.methods.divprune import max_min_greedy

from families import FAMILIES
from reference import language_model_inputs, reference_forward

torch.set_grad_enabled(False)
NO_STAGES = VisiPrunerConfig(stages=())


# ------------------------------------------------------------------ slow references of the selections
def reference_cdpruner(visual, instruction, k):
    """CDPruner's greedy MAP, one step at a time with explicit determinants: each step adds the token
    whose addition gives the largest log det of the conditional kernel's submatrix."""
    v = [F.normalize(x.double(), dim=0) for x in visual]
    q = [F.normalize(x.double(), dim=0) for x in instruction]
    rel = [sum(float(vi @ qj) for qj in q) / len(q) for vi in v]
    lo, hi = min(rel), max(rel)
    rel = [(r - lo) / (hi - lo) for r in rel]
    n = len(v)
    L = torch.tensor([[rel[i] * float(v[i] @ v[j]) * rel[j] for j in range(n)] for i in range(n)], dtype=torch.float64)
    chosen = []
    for _ in range(k):
        best, best_val = None, -math.inf
        for i in range(n):
            if i in chosen:
                continue
            sign, logdet = torch.linalg.slogdet(L[chosen + [i]][:, chosen + [i]])
            val = float(logdet) if sign > 0 else -math.inf
            if val > best_val:  # strict: ties keep the earlier token
                best, best_val = i, val
        chosen.append(best)
    return chosen


def reference_divprune(visual, k):
    """DivPrune's greedy max-min selection by brute force: the first token is the one farthest from
    its nearest neighbour; each next one maximises its smallest distance to the tokens chosen."""
    n = len(visual)
    d = [[1.0 - float(F.cosine_similarity(visual[i].double(), visual[j].double(), dim=0)) for j in range(n)]
         for i in range(n)]
    first = max(range(n), key=lambda i: (min(d[i][j] for j in range(n) if j != i), -i))
    chosen = [first]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i][j] for j in chosen), -i)))
    return chosen


def _tokens(seed, n, d, clusters=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if clusters:  # near-duplicates around a few centres: what diversity has to see through
        centres = torch.randn(clusters, d, generator=g) * 3
        x = centres[torch.arange(n) % clusters] + 0.3 * x
    return x


@pytest.mark.parametrize("seed,n,d,clusters,k", [(0, 12, 16, 0, 5), (1, 20, 8, 4, 7), (2, 16, 32, 3, 10)])
def test_greedy_dpp_map_is_the_log_det_greedy(seed, n, d, clusters, k):
    from visipruner.methods.cdpruner import conditional_kernel, instruction_relevance

    visual, instruction = _tokens(seed, n, d, clusters), _tokens(seed + 100, 5, d)
    r = instruction_relevance(visual, instruction)
    picks = greedy_dpp_map(conditional_kernel(visual, r), k, r.argsort(descending=True, stable=True))
    assert picks.tolist() == reference_cdpruner(visual, instruction, k)


def test_dpp_fills_by_relevance_past_the_kernels_rank():
    """Budget above the kernel's rank (d = 3 < k): the greedy stops where every gain is zero and the
    rest follows relevance; the token with relevance 0 is only taken there."""
    visual, instruction = _tokens(3, 10, 3), _tokens(4, 2, 3)
    from visipruner.methods.cdpruner import conditional_kernel, instruction_relevance

    r = instruction_relevance(visual, instruction)
    picks = greedy_dpp_map(conditional_kernel(visual, r), 6, r.argsort(descending=True, stable=True)).tolist()
    ranked = reference_cdpruner(visual, instruction, 3)
    assert picks[:3] == ranked and len(set(picks)) == 6
    assert picks[3:] == [i for i in r.argsort(descending=True, stable=True).tolist() if i not in ranked][:3]


@pytest.mark.parametrize("seed,n,d,clusters,k", [(0, 12, 16, 0, 5), (1, 20, 8, 4, 7), (2, 30, 4, 5, 12)])
def test_max_min_greedy_is_the_brute_force_greedy(seed, n, d, clusters, k):
    visual = _tokens(seed, n, d, clusters)
    assert max_min_greedy(visual, k).tolist() == reference_divprune(visual, k)


def test_max_min_spreads_over_clusters():
    """With k = number of clusters, every cluster gets exactly one kept token (the max-min optimum)."""
    visual = _tokens(5, 24, 16, clusters=6)
    picks = max_min_greedy(visual, 6).tolist()
    assert sorted(p % 6 for p in picks) == list(range(6))


# ----------------------------------------------------------------------- every family, explicit removal
def _instruction_and_visual(model, inputs, fam):
    """The prompt's layer-0 input as the family builds it: visual rows, and the text rows after the
    first visual token (written here from input_ids and the model's visual token ids)."""
    got = language_model_inputs(model, inputs["input_ids"], inputs.get("pixel_values"), **fam.reference_inputs(inputs))
    h = got["inputs_embeds"][0]
    ids = inputs["input_ids"][0]
    vis_ids = [getattr(model.config, k, None) for k in ("image_token_id", "video_token_id")]
    is_vis = torch.isin(ids, torch.tensor([t for t in vis_ids if t is not None]))
    first = int(is_vis.nonzero()[0])
    text = ~is_vis & (torch.arange(len(ids)) > first)
    return h[is_vis], h[text]


def _params():
    return [pytest.param(f, layout, id=f"{f.name}-{layout}", marks=f.marks) for f in FAMILIES for layout in f.layouts]


@pytest.mark.parametrize("fam,layout", _params())
def test_selection_before_the_language_model_matches_explicit_removal(fam, layout):
    """On every family: the kept set is the reference selection on the layer-0 input; the logits are
    those of the reference forward with the other visual tokens deleted before layer 0 (kept tokens at
    their own, M-RoPE, positions); every layer holds the kept tokens; cached greedy generation equals
    the reference recomputed on each longer sequence with the prompt's kept set."""
    model = fam.build(3, "sdpa", 4)
    inputs, spans = fam.prompt(model, 3, layout)
    visual, instruction = _instruction_and_visual(model, inputs, fam)
    m = visual.shape[0]
    k = max(2, m // 3)
    cases = [(CDPrunerConfig(keep_tokens=k), sorted(reference_cdpruner(visual, instruction, k))),
             (DivPruneConfig(keep_ratio=k / m), sorted(reference_divprune(visual, math.ceil(k / m * m))))]
    steps = 3
    for cfg, expected in cases:
        with visipruner.apply(model, cfg) as h:
            out = model(**inputs).logits[0]
            kept = list(h.method.kept)
            model.generation_config.eos_token_id = None
            gen = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        s = h.last_stats
        assert kept == expected, cfg.method
        ref = reference_forward(model, inputs["input_ids"], inputs.get("pixel_values"), NO_STAGES,
                                extra_inputs=fam.reference_inputs(inputs), spans=spans, input_keep=kept)
        torch.testing.assert_close(out, ref.logits, atol=1e-5, rtol=0, msg=cfg.method)
        assert s.visual_tokens_per_layer == [len(expected)] * 4 == ref.visual_tokens_per_layer
        assert s.num_visual_tokens == m and s.prefill_flops < s.dense_prefill_flops
        n = inputs["input_ids"].shape[1]
        new = gen.sequences[:, n:]
        if bool(torch.isin(new, torch.tensor([model.config.image_token_id])).any()):
            continue  # a random model generated its image token: the longer prompt would not be a prompt
        for t in range(steps):
            full = fam.extend(inputs, new[:, :t])
            r = reference_forward(model, full["input_ids"], full.get("pixel_values"), NO_STAGES,
                                  extra_inputs=fam.reference_inputs(full), spans=spans, input_keep=kept)
            torch.testing.assert_close(gen.logits[t][0], r.logits[-1], atol=1e-5, rtol=0, msg=f"{cfg.method} step {t}")


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "gemma3", "llava_onevision"])
def test_batch_rows_select_as_if_alone(name):
    from test_batches import _rows, check_rows_as_if_alone

    model, prompts = _rows(name)
    check_rows_as_if_alone(model, prompts, CDPrunerConfig(keep_ratio=0.3))
    check_rows_as_if_alone(model, prompts, DivPruneConfig(keep_tokens=5))


def test_full_budget_is_the_unpruned_model():
    fam = FAMILIES[0]
    model = fam.build(0, "sdpa", 4)
    inputs, _ = fam.prompt(model, 0, "two")
    logits = model(**inputs).logits
    for cfg in (CDPrunerConfig(keep_ratio=1.0), DivPruneConfig(keep_tokens=10_000)):
        with visipruner.apply(model, cfg):
            assert torch.equal(model(**inputs).logits, logits)


# ----------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("make", [CDPrunerConfig, DivPruneConfig])
def test_budget_is_one_of_ratio_or_tokens_and_in_range(make):
    with pytest.raises(ValueError, match="not both"):
        make(keep_ratio=0.2, keep_tokens=64)
    for bad in ({"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"keep_ratio": "0.2"}, {"keep_tokens": 0},
                {"keep_tokens": 2.5}, {"keep_tokens": True}):
        with pytest.raises(ValueError, match="keep_"):
            make(**bad)
    cfg = make(keep_tokens=64)
    assert visipruner.config_from_json(cfg.to_json()) == cfg


def test_mobilevlm_selects_among_its_pooled_tokens(tmp_path):
    """MobileVLM (LDP projector pools the patch grid: VisionZip refuses it) takes CDPruner and DivPrune:
    they choose among the projector's output tokens, which is what its language model gets."""
    from visipruner.models import load_mobilevlm

    from test_mobilevlm import prompt_inputs, write_checkpoint

    model, processor = load_mobilevlm(write_checkpoint(tmp_path))
    inputs = prompt_inputs(processor)
    got = language_model_inputs(model, inputs["input_ids"], inputs["pixel_values"])
    h, ids = got["inputs_embeds"][0], inputs["input_ids"][0]
    is_vis = ids == model.config.image_token_id
    text = ~is_vis & (torch.arange(len(ids)) > int(is_vis.nonzero()[0]))
    for cfg, expected in ((CDPrunerConfig(keep_tokens=20), sorted(reference_cdpruner(h[is_vis], h[text], 20))),
                          (DivPruneConfig(keep_tokens=20), sorted(reference_divprune(h[is_vis], 20)))):
        with visipruner.apply(model, cfg) as hd:
            out = model(**inputs).logits[0]
        assert hd.method.kept == expected, cfg.method
        ref = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], NO_STAGES, input_keep=expected)
        torch.testing.assert_close(out, ref.logits, atol=1e-4, rtol=0, msg=cfg.method)
        assert hd.last_stats.visual_tokens_per_layer[0] == 20 and hd.last_stats.num_visual_tokens == 144
