"""Peer methods on the shared runtime, each against the slow reference with its own rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import visipruner
from visipruner import (
    AttentionSelectConfig,
    DARTConfig,
    FastVConfig,
    PDropConfig,
    RandomConfig,
    SparseVLMConfig,
    VisiPrunerConfig,
    VTWConfig,
)
from visipruner.testing import random_prompt, tiny_llava

from reference import reference_forward

torch.set_grad_enabled(False)
NO_STAGES = VisiPrunerConfig(stages=())


def top_attention(layers_to_ratio):
    """Reference rule: at each listed layer keep ceil(ratio * m) tokens with highest mean attention."""

    def rule(layer, probs, ids, hidden):
        if layer not in layers_to_ratio:
            return None
        k = math.ceil(layers_to_ratio[layer] * len(ids))
        return ids[probs.mean(0).argsort(descending=True, stable=True)[:k]]

    return rule


def dart_rule(layer_k, ratio, pivots):
    def rule(layer, probs, ids, hidden):
        if layer != layer_k:
            return None
        k = math.ceil(ratio * len(ids))
        piv = hidden.norm(dim=-1).argsort(descending=True, stable=True)[: min(pivots, k)]
        keep = set(piv.tolist())
        sims = torch.stack([F.cosine_similarity(hidden, hidden[p][None], dim=-1) for p in piv.tolist()]).max(0).values
        for j in sims.argsort(stable=True).tolist():
            if len(keep) >= k:
                break
            keep.add(j)
        return ids[sorted(keep)]

    return rule


def random_rule(layer_k, ratio, seed):
    def rule(layer, probs, ids, hidden):
        if layer != layer_k:
            return None
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
        return ids[perm[: math.ceil(ratio * len(ids))]]

    return rule


def sparsevlm_rule(plan, recycle_ratio, cluster_ratio, knn):
    """Reference SparseVLM, written out with loops: raters, scores, budget, density-peak recycling."""
    state = {}

    def rule(layer, probs, ids, hidden, text_probs):
        if layer not in plan:
            return None
        if layer == min(plan):
            state["n"] = len(ids)  # nothing pruned yet: every visual token of the prompt
        m = len(ids)
        budget = min(m, math.ceil(plan[layer] * state["n"]))
        mass = [float(r.sum()) for r in text_probs]
        mean_mass = sum(mass) / len(mass)
        raters = [i for i in range(len(mass)) if mass[i] >= mean_mass]
        score = [sum(float(text_probs[r, j]) for r in raters) / len(raters) for j in range(m)]
        order = sorted(range(m), key=lambda j: (-score[j], j))
        n_drop = m - budget
        n_rec = math.floor(recycle_ratio * n_drop)
        n_cl = min(n_rec, math.ceil(cluster_ratio * n_rec), budget)
        kept = order[: budget - n_cl]
        cand = order[budget - n_cl : budget - n_cl + n_rec]
        merges = []
        if n_cl:
            x = hidden[cand].double()
            dist = [[float((x[a] - x[b]).norm()) for b in range(len(cand))] for a in range(len(cand))]
            k = min(knn, len(cand) - 1)
            rho = [math.exp(-sum(v * v for v in sorted(row)[1 : k + 1]) / k) if k else 1.0 for row in dist]
            dens_order = sorted(range(len(cand)), key=lambda a: (-rho[a], a))
            delta = []
            for a in range(len(cand)):
                higher = dens_order[: dens_order.index(a)]
                delta.append(min(dist[a][b] for b in higher) if higher else max(dist[a]))
            centres = sorted(range(len(cand)), key=lambda a: (-rho[a] * delta[a], a))[:n_cl]
            for ci, c in enumerate(centres):
                members = [a for a in range(len(cand))
                           if a != c and a not in centres and min(range(n_cl), key=lambda t: (dist[a][centres[t]], t)) == ci]
                merges.append((int(ids[cand[c]]), [int(ids[cand[a]]) for a in members]))
                kept.append(cand[c])
        return ids[sorted(kept)], merges

    rule.wants_text = True
    return rule


CASES = {
    "fastv": (FastVConfig(layer=2, keep_ratio=0.5), top_attention({2: 0.5})),
    "fastv_k1": (FastVConfig(layer=1, keep_ratio=0.3), top_attention({1: 0.3})),
    "pdrop": (PDropConfig(layers=(2, 4, 6), keep_ratio=0.5), top_attention({2: 0.5, 4: 0.5, 6: 0.5})),
    "pdrop_default": (PDropConfig(), top_attention({2: 0.5, 4: 0.5, 6: 0.5})),  # 8/16/24 of 32 -> 2/4/6 of 8
    "vtw": (VTWConfig(layer=3), top_attention({3: 0.0})),
    "vtw_default": (VTWConfig(), top_attention({4: 0.0})),
    "random": (RandomConfig(layer=2, keep_ratio=0.4, seed=3), random_rule(2, 0.4, 3)),
    "dart": (DARTConfig(layer=2, keep_ratio=0.25, pivots=2), dart_rule(2, 0.25, 2)),
    "sparsevlm": (SparseVLMConfig(layers=(1, 3, 5), keep_fractions=(0.6, 0.4, 0.2), recycle_ratio=0.5,
                                  cluster_ratio=0.34, knn=2),
                  sparsevlm_rule({1: 0.6, 3: 0.4, 5: 0.2}, 0.5, 0.34, 2)),
    "sparsevlm_default": (SparseVLMConfig(), sparsevlm_rule({0: 300 / 576, 2: 200 / 576, 4: 110 / 576}, 0.3, 0.1, 5)),
}


def replayed(rule):
    """``(recording_rule, replay_rule)``: the first records ``rule``'s decisions on the prompt, the
    second returns them again per layer (a longer sequence must not be re-decided: no decisions
    are taken while decoding)."""
    decisions = {}

    def record(layer, *args, **kw):
        decisions[layer] = rule(layer, *args, **kw)
        return decisions[layer]

    def replay(layer, *args, **kw):
        return decisions.get(layer)

    record.wants_text = getattr(rule, "wants_text", False)
    return record, replay


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_peer_matches_reference(name, seed):
    cfg, rule = CASES[name]
    model = tiny_llava(seed)
    check_peer(model, random_prompt(model, seed=seed, images=1 + seed), cfg, rule)


def check_peer(model, inputs, cfg, rule):
    """The peer ``cfg`` on the fast path == the slow reference driven by ``rule``; it pruned
    something; its cached greedy generation == the reference recomputed per token."""
    record, replay = replayed(rule)
    ref = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], NO_STAGES, drop_rule=record)
    steps = 3
    with visipruner.apply(model, cfg) as h:
        out = model(**inputs).logits[0]
        model.generation_config.eos_token_id = None
        gen = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert h.last_stats.visual_tokens_per_layer == ref.visual_tokens_per_layer
    assert min(ref.visual_tokens_per_layer) < ref.visual_tokens_per_layer[0]  # it pruned something
    torch.testing.assert_close(out, ref.logits, atol=1e-5, rtol=0)
    assert len(h.last_stats.decode_flops) == steps - 1
    assert h.last_stats.prefill_flops < h.last_stats.dense_prefill_flops
    # cached greedy generation == the reference recomputed without cache on each longer sequence,
    # replaying the prompt's decisions
    n = inputs["input_ids"].shape[1]
    for t in range(steps):
        ids = gen.sequences[:, : n + t]
        full = reference_forward(model, ids, inputs["pixel_values"], NO_STAGES, drop_rule=replay)
        assert full.visual_tokens_per_layer == ref.visual_tokens_per_layer
        torch.testing.assert_close(gen.logits[t][0], full.logits[-1], atol=1e-5, rtol=0, msg=f"step {t}")
        assert int(full.logits[-1].argmax()) == int(gen.sequences[0, n + t])


def test_attention_selection_ablation_matches_reference():
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0)
    cfg = AttentionSelectConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=0.04, exit_threshold=0.0)
    ref = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], cfg, selection="attention")
    value_aware = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], cfg)
    with visipruner.apply(model, cfg) as h:
        out = model(**inputs).logits[0]
    torch.testing.assert_close(out, ref.logits, atol=1e-5, rtol=0)
    assert h.last_stats.critical_tokens == ref.critical_tokens
    assert len(ref.critical_tokens) == len(value_aware.critical_tokens)
    assert 0 < len(ref.critical_tokens) < 16
    assert ref.critical_tokens != value_aware.critical_tokens  # the two rules really differ here


def test_sparsevlm_recycling_changes_the_output():
    """The merged (recycled) tokens are not a no-op: without recycling the reference differs."""
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0)
    with_rec = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], NO_STAGES,
                                 drop_rule=sparsevlm_rule({1: 0.6, 3: 0.4, 5: 0.2}, 0.5, 0.34, 2))
    without = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], NO_STAGES,
                                drop_rule=sparsevlm_rule({1: 0.6, 3: 0.4, 5: 0.2}, 0.0, 0.34, 2))
    assert with_rec.visual_tokens_per_layer == without.visual_tokens_per_layer
    assert (with_rec.logits - without.logits).abs().max() > 1e-3
    with visipruner.apply(model, CASES["sparsevlm"][0]) as h:
        model(**inputs)
    per_layer = h.last_stats.method["per_layer"]
    assert all(v["recycled"] > 0 for v in per_layer.values())
    assert h.last_stats.prefill_flops < h.last_stats.dense_prefill_flops


@pytest.mark.parametrize("cfg", [cfg for cfg, _ in CASES.values()] + [AttentionSelectConfig(), visipruner.VisionZipConfig()])
def test_every_config_round_trips_json(cfg):
    assert visipruner.config_from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: FastVConfig(keep_ratio=1.5), "keep_ratio"),
        (lambda: FastVConfig(layer=-1), "layer"),
        (lambda: PDropConfig(layers=(2, -3)), "layers"),
        (lambda: DARTConfig(pivots=0), "pivots"),
        (lambda: RandomConfig(seed=-1), "seed"),
        (lambda: SparseVLMConfig(keep_fractions=(0.5, 0.6, 0.1)), "keep_fractions"),
        (lambda: SparseVLMConfig(layers=(1, 2), keep_fractions=(0.5, 0.4, 0.1)), "layers"),
        (lambda: SparseVLMConfig(recycle_ratio=2.0), "recycle_ratio"),
    ],
)
def test_peer_configs_validate(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_layer_beyond_depth_is_a_clear_error():
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0)
    with visipruner.apply(model, FastVConfig(layer=40)):
        with pytest.raises(ValueError, match="outside"):
            model(**inputs)
    assert visipruner.config_from_dict({"method": "fastv", "layer": 3}).layer == 3
    with pytest.raises(ValueError, match="known methods"):
        visipruner.config_from_dict({"method": "nope"})


def _reference_visionzip(model, inputs, n_dom, n_ctx):
    """VisionZip by hand: CLS attention from the eager vision tower's own attention maps, explicit
    merging loops, then Hugging Face's unmodified forward on the shortened prompt."""
    vt = model.model.vision_tower
    impl = vt.config._attn_implementation
    vt.config._attn_implementation = "eager"
    try:
        out = vt(inputs["pixel_values"], output_attentions=True, output_hidden_states=True, return_dict=True)
    finally:
        vt.config._attn_implementation = impl
    L = len(out.attentions)
    cls = out.attentions[L - 1][:, :, 0, 1:].mean(1)  # last layer (vision_feature_layer=-1)
    layer = getattr(vt, "vision_model", vt).encoder.layers[L - 1]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[L - 1]))[:, 1:]
    feats = out.hidden_states[L][:, 1:]
    zipped = []
    for b in range(feats.shape[0]):
        order = sorted(range(feats.shape[1]), key=lambda j: (-float(cls[b, j]), j))
        dom = sorted(order[:n_dom])
        rest = [j for j in range(feats.shape[1]) if j not in dom]
        targets = [rest[int(i * len(rest) / n_ctx)] for i in range(n_ctx)]
        groups = {t: [t] for t in targets}
        for j in rest:
            if j in groups:
                continue
            sims = [float(F.cosine_similarity(keys[b, j], keys[b, t], dim=0)) for t in targets]
            groups[targets[max(range(n_ctx), key=lambda i: (sims[i], -i))]].append(j)
        ctx = [feats[b, groups[t]].mean(0) for t in targets]
        zipped.append(torch.cat([feats[b, dom], torch.stack(ctx)]))
    image_features = model.model.multi_modal_projector(torch.stack(zipped))
    ids = inputs["input_ids"][0].tolist()
    new_ids, positions, run = [], [], 0
    for p, t in enumerate(ids):
        if t == model.config.image_token_id:
            if run % feats.shape[1] < n_dom + n_ctx:
                new_ids.append(t)
                positions.append(p)  # kept slots and text keep their original positions
            run += 1
        else:
            new_ids.append(t)
            positions.append(p)
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    ids_t = torch.tensor([new_ids])
    return model(input_ids=ids_t, position_ids=torch.tensor([positions]), attention_mask=torch.ones_like(ids_t),
                 mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(image_features))}).logits[0]


@pytest.mark.parametrize("images", [1, 2])
def test_visionzip_matches_reference(images):
    model = tiny_llava(0, image_size=64)  # 64 patches per image
    inputs = random_prompt(model, seed=0, images=images)
    cfg = visipruner.VisionZipConfig(dominant_ratio=10 / 64, contextual_ratio=4 / 64)
    ref = _reference_visionzip(model, inputs, 10, 4)
    with visipruner.apply(model, cfg) as h:
        out = model(**inputs).logits[0]
        model.generation_config.eos_token_id = None
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    s = h.last_stats
    assert s.visual_tokens_per_layer == [14 * images] * 8 and s.num_visual_tokens == 64 * images
    assert s.prompt_length == inputs["input_ids"].shape[1]  # dense FLOPs count the full prompt
    assert s.prefill_flops < 0.5 * s.dense_prefill_flops and len(s.decode_flops) == 3
    # cached generation equals the reference recomputed without cache on each longer prompt
    n = inputs["input_ids"].shape[1]
    for t in range(4):
        longer = {"input_ids": gen.sequences[:, : n + t], "pixel_values": inputs["pixel_values"]}
        full = _reference_visionzip(model, longer, 10, 4)[-1]
        torch.testing.assert_close(gen.logits[t][0], full, atol=1e-5, rtol=0, msg=f"step {t}")
        assert int(full.argmax()) == int(gen.sequences[0, n + t])
