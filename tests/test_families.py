"""Every supported family (tests/families.py): exactness when disabled, fast path == the slow
reference with the family's own masks and positions, cached generation == recomputation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import visipruner
from visipruner import FastVConfig, Schedule, VisiPrunerConfig

from families import FAMILIES, family
from reference import bidirectional_blocks, reference_forward, text_model, visibility

torch.set_grad_enabled(False)

K = 2
LAYERS = 8
STAGE_SUBSETS = [("middle", "deep")] + [
    c for r in range(4) for c in itertools.combinations(("shallow", "middle", "deep"), r) if c != ("middle", "deep")
]


def _params(layouts=None):
    out = []
    for f in FAMILIES:
        for layout in f.layouts if layouts is None else [l for l in f.layouts if l in layouts]:
            out.append(pytest.param(f, layout, id=f"{f.name}-{layout}", marks=f.marks))
    return out


def _ref(fam, model, inputs, spans, cfg, **kw):
    return reference_forward(model, inputs["input_ids"], inputs.get("pixel_values"), cfg,
                             extra_inputs=fam.reference_inputs(inputs), spans=spans, **kw)


def _greedy(model, inputs, steps):
    model.generation_config.eos_token_id = None
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def _median_norm(fam, model, inputs, spans, shallow=True):
    """A tokens_threshold between two observed norms at layer K+1 (about half the tokens critical)."""
    probe = VisiPrunerConfig(stages=("shallow", "middle") if shallow else ("middle",), shallow_layers=K,
                             layer_threshold=1.0, tokens_threshold=0.0)
    norms = _ref(fam, model, inputs, spans, probe).norms[K + 1].sort().values
    mid = len(norms) // 2
    return float(norms[mid - 1] + norms[mid]) / 2


def _config(stages, median):
    # every stage present triggers: fusion at K+1 (half the tokens critical), exit after 2 more layers
    return VisiPrunerConfig(stages=stages, shallow_layers=K, layer_threshold=1.0, tokens_threshold=median,
                            exit_threshold=0.0, exit_patience=2)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("fam,layout", _params())
def test_disabled_is_bit_identical(fam, layout, impl):
    model = fam.build(0, impl, LAYERS)
    inputs, _ = fam.prompt(model, 0, layout)
    logits = model(**inputs).logits
    seq, steps = _greedy(model, inputs, 4)
    with visipruner.apply(model, VisiPrunerConfig(stages=())):
        assert torch.equal(model(**inputs).logits, logits)
        s2, st2 = _greedy(model, inputs, 4)
        assert torch.equal(s2, seq) and torch.equal(st2, steps)
    with visipruner.apply(model, _config(("shallow", "middle", "deep"), 0.0)) as h:
        pruned = model(**inputs).logits
    assert h.last_stats.exit_layer is not None and pruned.shape != logits.shape
    assert torch.equal(model(**inputs).logits, logits)  # removed: the unpruned model again
    s3, st3 = _greedy(model, inputs, 4)
    assert torch.equal(s3, seq) and torch.equal(st3, steps)


@pytest.mark.parametrize("fam,layout", _params())
def test_fast_path_matches_reference_for_every_stage_subset(fam, layout):
    model = fam.build(1, "sdpa", LAYERS)
    inputs, spans = fam.prompt(model, 1, layout)
    unpruned = model(**inputs).logits[0]
    medians = {True: _median_norm(fam, model, inputs, spans), False: _median_norm(fam, model, inputs, spans, False)}
    for stages in STAGE_SUBSETS:
        cfg = _config(stages, medians["shallow" in stages])
        ref = _ref(fam, model, inputs, spans, cfg)
        with visipruner.apply(model, cfg) as h:
            out = model(**inputs).logits[0]
        s = h.last_stats
        name = "+".join(stages) or "none"
        assert out.shape == ref.logits.shape, name
        torch.testing.assert_close(out, ref.logits, atol=1e-5, rtol=0, msg=name)
        if not stages:  # disabled: the model's own forward, untouched
            assert torch.equal(out, unpruned) and not s.pruning_applied
            continue
        assert (s.fusion_layer, s.exit_layer) == (ref.fusion_layer, ref.exit_layer), name
        assert s.critical_tokens == ref.critical_tokens, name
        assert s.visual_tokens_per_layer == ref.visual_tokens_per_layer, name
        assert s.num_images + s.num_frames == len(spans), name
        if "middle" in stages:
            assert s.fusion_layer == K + 1 and 0 < len(s.critical_tokens) < s.num_visual_tokens, name
        if "deep" in stages:
            assert s.exit_layer is not None, name
        assert out.shape != unpruned.shape or not torch.allclose(out, unpruned, atol=1e-4), name


@pytest.mark.parametrize("fam,layout", _params())
def test_reference_visibility_is_the_models_own_mask(fam, layout):
    """The masks the reference builds (causal, sliding windows, bidirectional image blocks) are the
    ones the family's own code hands each layer (eager: always a full additive matrix)."""
    model = fam.build(0, "eager", 4)
    inputs, _ = fam.prompt(model, 0, layout)
    lm, masks = text_model(model), {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, kw, i=i: masks.__setitem__(i, kw["attention_mask"]),
                                             with_kwargs=True) for i, layer in enumerate(lm.layers)]
    try:
        model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    n, tcfg = inputs["input_ids"].shape[1], lm.config
    blocks = bidirectional_blocks(model, fam.reference_inputs(inputs), n)
    types = getattr(tcfg, "layer_types", None) or ["full_attention"] * len(lm.layers)
    for i, mask in masks.items():
        own = mask[0, 0] > torch.finfo(mask.dtype).min / 2
        ref = visibility(n, types[i], getattr(tcfg, "sliding_window", None), blocks, torch.arange(n))
        assert torch.equal(own, ref), f"layer {i} ({types[i]})"


@pytest.mark.parametrize("fam,layout", _params())
def test_fastv_matches_reference(fam, layout):
    """A peer on the same runtime: FastV's top-R by the last token's attention after layer 2."""
    model = fam.build(2, "sdpa", LAYERS)
    inputs, spans = fam.prompt(model, 2, layout)
    cfg = FastVConfig(layer=2, keep_ratio=0.5)

    def rule(layer, probs, ids, hidden):
        if layer != 2:
            return None
        k = math.ceil(0.5 * len(ids))  # FastV keeps ceil(R * present)
        return ids[probs.float().mean(0).argsort(descending=True, stable=True)[:k]]

    ref = _ref(fam, model, inputs, spans, VisiPrunerConfig(stages=()), drop_rule=rule)
    with visipruner.apply(model, cfg) as h:
        out = model(**inputs).logits[0]
    torch.testing.assert_close(out, ref.logits, atol=1e-5, rtol=0)
    assert h.last_stats.visual_tokens_per_layer == ref.visual_tokens_per_layer


@pytest.mark.parametrize("fam,layout", _params())
def test_cached_generation_equals_recomputation(fam, layout):
    model = fam.build(3, "sdpa", LAYERS)
    inputs, spans = fam.prompt(model, 3, layout)
    cfg = _config(("shallow", "middle", "deep"), _median_norm(fam, model, inputs, spans))
    steps = 5
    with visipruner.apply(model, cfg) as h:
        seq, logits = _greedy(model, inputs, steps)
        stats = h.last_stats
    assert stats.exit_layer is not None and len(stats.decode_flops) == steps - 1
    assert stats.num_images + stats.num_frames == len(spans)  # generate() passes features, not grids
    schedule = Schedule(stats.fusion_layer, stats.critical_tokens, stats.exit_layer)
    n = inputs["input_ids"].shape[1]
    for t in range(steps):
        full_inputs = fam.extend(inputs, seq[:, n : n + t])
        with visipruner.apply(model, cfg, schedule=schedule):
            full = model(**full_inputs, use_cache=False).logits[0, -1]
        ref = _ref(fam, model, full_inputs, spans, cfg, schedule=schedule).logits[-1]
        torch.testing.assert_close(logits[t, 0], full, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[t, 0], ref, atol=1e-5, rtol=0)
        assert int(full.argmax()) == int(seq[0, n + t])


@pytest.mark.parametrize("fam", [f for f in FAMILIES if f.sliding], ids=lambda f: f.name)
def test_sliding_caches_decode_past_the_window(fam):
    """Eager, a prompt longer than the window, decoding past it: a sliding layer's cache keeps its
    last window - 1 entries, and with tokens pruned those reach back further than the window by
    original position, so each step's mask must come from original positions."""
    model = fam.build(4, "eager", LAYERS)
    inputs, spans = fam.prompt(model, 4, "one")
    tcfg, steps = model.model.language_model.config, 8
    window, n = tcfg.sliding_window, inputs["input_ids"].shape[1]
    assert n > window
    cfg = _config(("shallow", "middle", "deep"), _median_norm(fam, model, inputs, spans))
    with visipruner.apply(model, cfg) as h:
        model.generation_config.eos_token_id = None
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        kept = h._state.layer_positions  # original positions of the prompt tokens each layer holds
        stats = h.last_stats
    reaching_back = 0
    for i, layer_type in enumerate(tcfg.layer_types):
        if layer_type != "sliding_attention":
            continue
        assert out.past_key_values.layers[i].keys.shape[2] == window - 1
        for q in range(n, n + steps - 1):  # each decode step's query sees the cache's last window - 1 entries
            held = torch.cat([kept[i], torch.arange(n, q)])[-(window - 1):]
            reaching_back += int(held[0]) <= q - window  # held, but out of the query's window
    assert reaching_back > 0
    schedule = Schedule(stats.fusion_layer, stats.critical_tokens, stats.exit_layer)
    for t in range(steps):
        ref = _ref(fam, model, fam.extend(inputs, out.sequences[:, n : n + t]), spans, cfg, schedule=schedule)
        torch.testing.assert_close(out.logits[t][0], ref.logits[-1], atol=1e-5, rtol=0)
        assert int(ref.logits[-1].argmax()) == int(out.sequences[0, n + t])


def test_static_cache_is_refused_clearly():
    fam = family("gemma3")
    model = fam.build(0, "sdpa", 4)
    inputs, _ = fam.prompt(model, 0, "one")
    with visipruner.apply(model), pytest.raises(ValueError, match="dynamic KV cache"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


def test_gemma3_encoder_is_refused():
    model = family("gemma3").build(0, "sdpa", 1)
    model.config.text_config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        visipruner.apply(model)


def test_supported_models_and_the_error_that_lists_them():
    names = visipruner.supported_models()
    for cls in ("LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                "Gemma3ForConditionalGeneration", "InternVLForConditionalGeneration",
                "LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
                "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"):
        assert cls in names
    with pytest.raises(TypeError) as e:
        visipruner.apply(torch.nn.Linear(2, 2))
    assert "Linear" in str(e.value) and "Qwen2VLForConditionalGeneration" in str(e.value)


@pytest.mark.parametrize("name,family_name", [("qwen2_vl", "Qwen2-VL"), ("gemma3", "Gemma3")])
def test_visionzip_names_the_family_it_does_not_support(name, family_name):
    model = family(name).build(0, "sdpa", 2)
    with pytest.raises(ValueError, match=family_name):
        visipruner.apply(model, visipruner.VisionZipConfig())


def test_onevision_video_runs_split_into_frames():
    from visipruner.adapters.llava_next import video_frames

    # two videos of 2 frames (4 tokens each) back to back, each closed by its newline token
    spans = [(s.start, s.end) for s in video_frames((10, 28), 4, 2)]
    assert spans == [(10, 14), (14, 19), (19, 23), (23, 28)]
    assert [(s.start, s.end) for s in video_frames((0, 13), 4, None)] == [(0, 4), (4, 8), (8, 13)]
    for bad in ((0, 12), (0, 1)):
        with pytest.raises(ValueError, match="video tokens"):
            video_frames(bad, 4, None)


@pytest.mark.parametrize("name,family_name", [("internvl", "InternVL"), ("llava_next", "LLaVA-NeXT"),
                                              ("llava_onevision", "LLaVA-OneVision"), ("idefics3", "Idefics3"),
                                              ("smolvlm", "SmolVLM")])
def test_visionzip_refuses_other_families_by_name(name, family_name):
    from families import family

    model = family(name).build(0, "sdpa", 2)
    with pytest.raises(ValueError, match=family_name):
        visipruner.apply(model, visipruner.VisionZipConfig())


@pytest.mark.parametrize("onevision", [False, True], ids=["next", "onevision"])
def test_llava_next_images_back_to_back_split_by_their_token_counts(onevision):
    """Each image's token count from image_sizes equals the model's own packed features (tiles,
    unpadding, newline tokens, OneVision's anyres_max scaling), so images with no text between them
    are still one span each."""
    from visipruner.adapters import get_adapter
    from visipruner.testing import MM_IMAGE, tiny_llava_next

    model = tiny_llava_next(0, onevision=onevision, layers=1, pinpoints=((32, 64), (64, 32), (64, 192)))
    adapter = get_adapter(model)
    sizes = [(30, 64), (64, 20), (50, 190), (64, 192), (7, 100)]
    for multi in ([False, True] if onevision else [False]):
        kw = {"image_sizes": torch.tensor(sizes)}
        if multi:  # several images in a OneVision prompt: base tiles only
            kw["batch_num_images"] = torch.tensor([len(sizes)])
        pixels = torch.randn(len(sizes), 13, 3, 32, 32)
        counts = [len(f) for f in model.model.get_image_features(pixels, **kw).pooler_output]
        assert len(set(counts)) > 2 or multi
        ids = torch.tensor([5] + [MM_IMAGE] * sum(counts) + [6])
        got = [(s.start, s.end) for s in adapter.spans(ids, kw)]
        ends = torch.tensor(counts).cumsum(0).tolist()
        assert got == [(1 + e - c, 1 + e) for c, e in zip(counts, ends)]
        with pytest.raises(ValueError, match="image_sizes"):
            adapter.spans(ids[:-2], kw)
