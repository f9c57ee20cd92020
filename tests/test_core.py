"""The correctness backbone: fast path vs the slow reference, exactness when disabled, caching."""

from __future__ import annotations

import pytest
import torch

import visipruner
from visipruner import Schedule, VisiPrunerConfig
from visipruner.testing import IMAGE_TOKEN_ID, random_prompt, tiny_llava

from reference import reference_forward

torch.set_grad_enabled(False)

SEEDS = (0, 1, 2)


def _greedy(model, inputs, steps=8):
    model.generation_config.eos_token_id = None  # exactly `steps` plain argmax steps
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_disabled_is_bit_identical(impl):
    model = tiny_llava(0, attn_implementation=impl)
    inputs = random_prompt(model, seed=0, images=2)
    ref_logits = model(**inputs).logits
    ref_seq, ref_steps = _greedy(model, inputs)

    handle = visipruner.apply(model, VisiPrunerConfig(stages=()))
    assert torch.equal(model(**inputs).logits, ref_logits)
    seq, steps = _greedy(model, inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(steps, ref_steps)
    handle.remove()

    # enabled, then removed: the model is the unpruned model again
    with visipruner.apply(model, VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=0.0)) as h:
        pruned = model(**inputs).logits
        assert h.last_stats.fusion_layer == 3
    assert pruned.shape != ref_logits.shape  # pruning really happened
    assert model.config.text_config._attn_implementation == impl
    assert torch.equal(model(**inputs).logits, ref_logits)
    seq, steps = _greedy(model, inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(steps, ref_steps)


def test_prompt_without_images_passes_through():
    model = tiny_llava(1)
    ids = torch.randint(4, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits
    with visipruner.apply(model, VisiPrunerConfig(shallow_layers=2)) as h:
        assert torch.equal(model(input_ids=ids).logits, ref)
        assert not h.last_stats.pruning_applied


def _probe_thresholds(model, inputs, K, shallow=True):
    """A tokens_threshold splitting layer K+1's visual tokens in half, read off the reference."""
    stages = ("shallow", "middle") if shallow else ("middle",)
    probe = VisiPrunerConfig(stages=stages, shallow_layers=K, layer_threshold=1.0, tokens_threshold=0.0)
    r = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], probe)
    norms = r.norms[K + 1].sort().values
    mid = len(norms) // 2  # halfway between two observed norms, never on one
    return float(norms[mid - 1] + norms[mid]) / 2, r


# name -> the stage subset it runs, whether fusion and exit must trigger (None: nothing must change)
SUBSETS = {
    "middle_deep": (("middle", "deep"), True, True),  # the shipped config's stages, first
    "disabled": ((), False, False),
    "shallow": (("shallow",), False, False),
    "middle": (("middle",), True, False),
    "deep": (("deep",), False, True),
    "shallow_middle": (("shallow", "middle"), True, False),
    "shallow_deep": (("shallow", "deep"), False, True),
    "shallow_middle_deep": (("shallow", "middle", "deep"), True, True),
}
VARIANTS = {  # name -> (fusion, exit) that must trigger
    "shallow_renorm": (False, False),
    "all_consecutive": (True, True),
    "relative": (True, True),
    "none_trigger": (False, False),
}


def _configs(model, inputs):
    """Every stage subset (thresholds making each enabled stage act), then the variants."""
    K = 2
    shallow_norm, probe = _probe_thresholds(model, inputs, K)
    middle_norm, _ = _probe_thresholds(model, inputs, K, shallow=False)
    out = {}
    for name, (stages, _, _) in SUBSETS.items():
        # fusion at the first checked layer (K+1) keeping half the visual tokens; exit two layers after
        out[name] = VisiPrunerConfig(
            stages=stages, shallow_layers=K, layer_threshold=1.0, exit_threshold=0.0, exit_patience=2,
            tokens_threshold=shallow_norm if "shallow" in stages else middle_norm,
        )
    full = dict(shallow_layers=K, tokens_threshold=shallow_norm)
    out.update({
        "shallow_renorm": VisiPrunerConfig(stages=("shallow",), shallow_layers=3, shallow_renormalise=True),
        "all_consecutive": VisiPrunerConfig(
            layer_threshold=1.0, exit_threshold=0.0, exit_patience=1, exit_counting="consecutive", **full
        ),
        "relative": VisiPrunerConfig(
            layer_threshold=1.0, exit_threshold=0.0, relative_tokens_threshold=True, shallow_layers=K,
            tokens_threshold=shallow_norm / float(probe.output_norms[K + 1]),
        ),
        "none_trigger": VisiPrunerConfig(shallow_layers=K, layer_threshold=-1.0, tokens_threshold=0.0),
    })
    return out


def _without_shallow(name):
    stages = SUBSETS[name][0]
    return next(n for n, (s, _, _) in SUBSETS.items() if s == tuple(x for x in stages if x != "shallow"))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("images", [1, 2])
def test_fast_path_matches_reference(seed, images):
    model = tiny_llava(seed)
    check_stages_match_reference(model, random_prompt(model, seed=seed, images=images))


def check_stages_match_reference(model, inputs):
    """Every stage subset and variant of ``_configs``: fast path == slow reference (logits and
    decisions), each enabled stage acted, and nothing else did."""
    unpruned = model(**inputs).logits[0]
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    L = model.config.text_config.num_hidden_layers
    cfgs = _configs(model, inputs)
    assert list(cfgs)[:len(SUBSETS)] == list(SUBSETS)  # all eight subsets, shipped middle+deep first
    assert len({frozenset(s) for s, _, _ in SUBSETS.values()}) == 8
    outs, stats = {}, {}
    for name, cfg in cfgs.items():
        ref = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], cfg)
        with visipruner.apply(model, cfg) as h:
            out = model(**inputs).logits[0]
        outs[name] = out
        s = stats[name] = h.last_stats
        assert out.shape == ref.logits.shape, name
        torch.testing.assert_close(out, ref.logits, atol=1e-5, rtol=0, msg=name)
        assert s.fusion_layer == ref.fusion_layer, name
        assert s.exit_layer == ref.exit_layer, name
        assert s.critical_tokens == ref.critical_tokens, name
        assert s.pruning_applied == (name != "disabled"), name
        if s.pruning_applied:
            assert s.visual_tokens_per_layer == ref.visual_tokens_per_layer, name
        # the stages this config enables really acted (and the others did not)
        want_fusion, want_exit = SUBSETS[name][1:] if name in SUBSETS else VARIANTS[name]
        assert (s.fusion_layer is not None, s.exit_layer is not None) == (want_fusion, want_exit), name
        if want_fusion:
            assert s.fusion_layer == 3 and 0 < len(s.critical_tokens) < n_vis, name
        if want_exit:  # two no-impact layers from the first checked one (one, consecutive)
            assert s.exit_layer == (3 if name == "all_consecutive" else 4) + want_fusion, name
        if name == "none_trigger":
            assert s.visual_tokens_per_layer == [n_vis] * L
        if name == "disabled":
            assert torch.equal(out, unpruned)
        elif name != "none_trigger":  # the method changed something
            assert out.shape != unpruned.shape or not torch.allclose(out, unpruned, atol=1e-4), name
    # the shallow stage changed the result in every subset it was added to
    for name, (stages, _, _) in SUBSETS.items():
        if "shallow" in stages:
            other = outs[_without_shallow(name)]
            assert outs[name].shape != other.shape or not torch.allclose(outs[name], other, atol=1e-4), name
    for name in ("middle_deep", "shallow_middle_deep"):  # fusion at 3, exit at 5
        s = stats[name]
        assert s.visual_tokens_per_layer == [n_vis] * 4 + [len(s.critical_tokens)] * 2 + [0] * (L - 6), name
    assert stats["deep"].visual_tokens_per_layer == [n_vis] * 5 + [0] * (L - 5)  # exit at 4


def test_reference_agrees_with_unpruned_model_when_disabled():
    """The reference itself is checked against Hugging Face's own forward."""
    model = tiny_llava(3)
    inputs = random_prompt(model, seed=3, images=2)
    ref = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], VisiPrunerConfig(stages=()))
    torch.testing.assert_close(ref.logits, model(**inputs).logits[0], atol=1e-5, rtol=0)


def test_measured_thresholds_trigger_stages_like_the_reference():
    """Thresholds between observed values (not 0/1 extremes): decisions still agree."""
    placed = 0
    for seed in range(6):
        model = tiny_llava(seed, layers=10)
        inputs = random_prompt(model, seed=seed)
        never = VisiPrunerConfig(stages=("shallow", "middle"), shallow_layers=2, layer_threshold=-1.0)
        probe = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], never)
        by_layer = sorted(probe.min_cos.items())
        # the first checked layer (not the first one) whose min cos is below all earlier ones
        # (else the first one, with a threshold just above its value)
        i = next((i for i in range(1, len(by_layer)) if by_layer[i][1] < min(c for _, c in by_layer[:i])), 0)
        placed += i > 0
        target_layer, target_cos = by_layer[i]
        above = min(c for _, c in by_layer[:i]) if i else min(c for _, c in by_layer if c > target_cos)
        layer_thr = (target_cos + above) / 2  # strictly between observed values
        norms = probe.norms[target_layer].sort().values
        tok_thr = float(norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2
        cfg = VisiPrunerConfig(shallow_layers=2, layer_threshold=layer_thr, tokens_threshold=tok_thr, exit_threshold=0.99)
        ref = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], cfg)
        with visipruner.apply(model, cfg) as h:
            out = model(**inputs).logits[0]
        torch.testing.assert_close(out, ref.logits, atol=1e-5, rtol=0)
        assert ref.fusion_layer == target_layer
        assert (h.last_stats.fusion_layer, h.last_stats.exit_layer) == (ref.fusion_layer, ref.exit_layer)
        assert h.last_stats.critical_tokens == ref.critical_tokens
    assert placed >= 1  # at least one seed puts fusion past the first checked layer


@pytest.mark.parametrize("seed", SEEDS)
def test_cached_generation_equals_recomputation(seed):
    model = tiny_llava(seed)
    check_cached_generation(model, random_prompt(model, seed=seed, images=1 + seed % 2))


def check_cached_generation(model, inputs):
    """Cached greedy generation == recomputing the pruned forward (fast path and reference) per token."""
    median_norm, _ = _probe_thresholds(model, inputs, 2)
    cfg = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=median_norm, exit_threshold=0.0)
    steps = 8
    with visipruner.apply(model, cfg) as h:
        seq, logits = _greedy(model, inputs, steps)
        stats = h.last_stats
    assert stats.exit_layer is not None and len(stats.decode_flops) == steps - 1
    schedule = Schedule(stats.fusion_layer, stats.critical_tokens, stats.exit_layer)
    prompt_len = inputs["input_ids"].shape[1]
    for t in range(steps):
        ids = seq[:, : prompt_len + t]
        # recompute everything, without cache, replaying the prompt's decisions: fast path ...
        with visipruner.apply(model, cfg, schedule=schedule):
            full = model(input_ids=ids, pixel_values=inputs["pixel_values"], use_cache=False).logits[0, -1]
        # ... and the slow reference
        ref = reference_forward(model, ids, inputs["pixel_values"], cfg, schedule=schedule).logits[-1]
        torch.testing.assert_close(logits[t, 0], full, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[t, 0], ref, atol=1e-5, rtol=0)
        assert int(full.argmax()) == int(seq[0, prompt_len + t])


def test_kv_cache_is_physically_shorter():
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0)
    cfg = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=0.0, exit_threshold=0.0)
    with visipruner.apply(model, cfg) as h:
        out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    lengths = [cache.layers[i].keys.shape[-2] for i in range(len(cache.layers))]
    assert lengths == h.last_stats.tokens_per_layer
    n = inputs["input_ids"].shape[1]
    n_vis = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert lengths[0] == n and lengths[-1] == n - n_vis


def test_schedule_replay_reproduces_decisions():
    model = tiny_llava(2)
    inputs = random_prompt(model, seed=2)
    median_norm, _ = _probe_thresholds(model, inputs, 2)
    cfg = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=median_norm, exit_threshold=0.0)
    with visipruner.apply(model, cfg) as h:
        measured = model(**inputs).logits
    sched = h.method.schedule_of_last_prompt()
    with visipruner.apply(model, cfg, schedule=sched) as h2:
        replayed = model(**inputs).logits
    # replay skips the influence rows, so only the FLOPs differ
    assert torch.equal(measured, replayed)
    assert h2.last_stats.prefill_flops < h.last_stats.prefill_flops


def test_bfloat16_model_runs_and_stays_close_to_float32():
    cfg = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=0.0, exit_threshold=0.0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llava(0, dtype=dtype)
        inputs = random_prompt(model, seed=0, images=2)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        if dtype == torch.float32:
            unpruned = model(**inputs).logits[0, -1]
        with visipruner.apply(model, cfg) as h:
            out[dtype] = model(**inputs).logits[0, -1].float()
            model.generation_config.eos_token_id = None
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert (h.last_stats.fusion_layer, h.last_stats.exit_layer) == (3, 5) and len(h.last_stats.decode_flops) == 2
    # relative to the logits' spread (std ~0.16 here): bf16's 8-bit mantissa gives ~0.03 std after
    # 8 layers; pruning itself moves these logits by ~1.6 std, so the bound tells the two apart
    ref = out[torch.float32]
    tolerance = 0.1 * float(ref.std())
    assert float((out[torch.bfloat16] - ref).abs().max()) <= tolerance
    assert float((unpruned - ref).abs().max()) > 10 * tolerance


def test_qwen2_language_model_matches_reference():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    torch.manual_seed(0)
    text = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default", vision_feature_layer=-1)).eval()
    inputs = random_prompt(model, seed=0)
    median_norm, _ = _probe_thresholds(model, inputs, 2)
    cfg = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=median_norm, exit_threshold=0.0)
    ref = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], cfg)
    with visipruner.apply(model, cfg) as h:
        out = model(**inputs).logits[0]
    torch.testing.assert_close(out, ref.logits, atol=1e-5, rtol=0)
    assert h.last_stats.visual_tokens_per_layer == ref.visual_tokens_per_layer == [16, 16, 16, 16, 8, 8]


@pytest.mark.parametrize("heads, kv_heads, ranks", [(8, 4, 2), (8, 2, 4), (4, 1, 2)])
def test_influence_sums_of_head_shares_add_up_to_the_whole_models(heads, kv_heads, ranks):
    """Tensor parallelism: each rank holds heads/ranks query heads and their KV heads (replicated where
    there are fewer KV heads than ranks); the ranks' ``influence_sums`` added give the influence of every
    head, checked against c_j = concat_h a[h,j] v[h,j] formed explicitly (before o_proj)."""
    from visipruner.attention import influence_from_sums, influence_sums, last_row_influence, repeat_kv

    g = torch.Generator().manual_seed(heads + kv_heads + ranks)
    n, d, scale = 40, 16, 0.25
    q = torch.randn(1, heads, 1, d, generator=g)
    k, v = torch.randn(1, kv_heads, n, d, generator=g), torch.randn(1, kv_heads, n, d, generator=g)
    vis = torch.arange(5, 29)
    a = torch.softmax((q[0, :, 0, None] * repeat_kv(k, heads // kv_heads)[0]).sum(-1).double() * scale, -1)  # (H, n)
    vr = repeat_kv(v, heads // kv_heads)[0].double()  # (H, n, d)
    c = (a[:, :, None] * vr).permute(1, 0, 2).reshape(n, -1)  # c_j = concat_h a[h,j] v[h,j]
    o = c.sum(0)
    cj = c[vis]
    want_cos = ((o - cj) @ o) / ((o - cj).norm(dim=-1) * o.norm())
    per = heads // ranks
    shares = []
    for r in range(ranks):
        hs = torch.arange(r * per, (r + 1) * per)
        kvs = (hs // (heads // kv_heads)).unique()  # the KV heads this rank's query heads read
        shares.append(influence_sums(q[:, hs], k[:, kvs], v[:, kvs], scale, vis))
    cos, norm, attention, onorm = influence_from_sums(sum(shares))
    torch.testing.assert_close(cos, want_cos.float())
    torch.testing.assert_close(norm, cj.norm(dim=-1).float())
    torch.testing.assert_close(attention, a[:, vis].mean(0).float())
    torch.testing.assert_close(onorm, o.norm().float())
    for got, whole in zip((cos, norm, attention, onorm), last_row_influence(q, k, v, scale, vis)):
        torch.testing.assert_close(got, whole)
