"""Every supported family (tests/families.py): exactness when disabled, fast path == the slow
reference with the family's own masks and positions, cached generation == recomputation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import visipruner
from visipruner import FastVConfig, Schedule, VisiPrunerConfig

from families import FAMILIES
from reference import reference_forward

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


def test_supported_models_and_the_error_that_lists_them():
    names = visipruner.supported_models()
    for cls in ("LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                "Qwen2_5_VLForConditionalGeneration", "InternVLForConditionalGeneration",
                "LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
                "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"):
        assert cls in names
    with pytest.raises(TypeError) as e:
        visipruner.apply(torch.nn.Linear(2, 2))
    assert "Linear" in str(e.value) and "Qwen2VLForConditionalGeneration" in str(e.value)


def test_visionzip_names_the_family_it_does_not_support():
    model = FAMILIES[1].build(0, "sdpa", 2)
    with pytest.raises(ValueError, match="Qwen2-VL"):
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
