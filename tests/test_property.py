"""Property-based: for prompt layouts and thresholds drawn at random (images first, last, several or
none, text of any length between them, video frames), the fast path equals the slow reference on a
tiny LLaVA and a tiny Qwen2-VL: the same logits (1e-5) and the same decisions. A small budget of
examples, derandomised so that CI runs the same ones every time."""

from __future__ import annotations

import functools

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")  # the `test` extra of pyproject.toml
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import visipruner  # noqa: E402
from visipruner import VisiPrunerConfig  # noqa: E402
from visipruner.testing import qwen_vl_prompt, random_prompt, tiny_llava, tiny_qwen_vl, tokens_per_image  # noqa: E402

from families import family  # noqa: E402
from reference import reference_forward  # noqa: E402

torch.set_grad_enabled(False)

LAYERS = 6
BUDGET = settings(max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
# hypothesis shrinks towards the first entry: the whole method first, disabled last
STAGE_SETS = [("shallow", "middle", "deep"), ("middle", "deep"), ("shallow", "middle"), ("middle",), ("deep",),
              ("shallow", "deep"), ("shallow",), ()]
RANKS = [0.5, 0.25, 0.75, 0.1, 0.9, 0.0, 1.0]  # where a threshold falls among the observed values


@functools.cache
def _model(name):
    if name == "llava":
        return tiny_llava(11, layers=LAYERS)
    return tiny_qwen_vl(11, version="2", layers=LAYERS)


def _llava_prompt(model, seed, images, prefix, between, suffix):
    inputs = random_prompt(model, seed=seed, prefix=prefix, suffix=suffix, images=images, between=between)
    per = tokens_per_image(model)
    spans = [(prefix + i * (per + between), prefix + i * (per + between) + per) for i in range(images)]
    if not images:
        del inputs["pixel_values"]
    return inputs, spans


@st.composite
def prompts(draw, name):
    """(model inputs, spans): 0-3 images, a Qwen video of 1-3 frames, text of any length around them."""
    seed = draw(st.integers(0, 2**16))
    prefix = draw(st.sampled_from([1, 2, 5]))  # 1: the first image right after BOS
    suffix = draw(st.sampled_from([0, 1, 4, 9]))  # 0: the prompt ends with visual tokens (LLaVA) or vision_end
    if name == "llava":
        # images back to back are one run of ids: LLaVA cannot tell them apart, so >= 1 text token between
        images, between = draw(st.sampled_from([1, 2, 3, 0])), draw(st.integers(1, 4))
        return _llava_prompt(_model(name), seed, images, prefix, between, suffix)
    grid = st.sampled_from([(4, 4), (4, 8), (8, 4), (8, 8)])
    images = draw(st.lists(grid, max_size=3))
    videos = draw(st.lists(st.tuples(st.integers(1, 3), *[st.sampled_from([4, 8])] * 2), max_size=1))
    if not images and not videos and not draw(st.booleans()):  # "none" now and then, not half the time
        images = [draw(grid)]
    return qwen_vl_prompt(_model(name), seed=seed, images=tuple(images), videos=tuple(videos), prefix=prefix,
                          suffix=suffix, between=draw(st.integers(0, 4)))


@st.composite
def configs(draw):
    """A VisiPruner config. The cosine and norm thresholds are drawn as ranks among the values a
    probe observes on the prompt (see ``_config``), so decisions land anywhere and never on an edge."""
    return dict(
        stages=draw(st.sampled_from(STAGE_SETS)),
        shallow_layers=draw(st.integers(1, 3)),
        layer_rank=draw(st.sampled_from(RANKS)),
        tokens_rank=draw(st.sampled_from(RANKS)),
        exit_rank=draw(st.sampled_from(RANKS)),
        relative_tokens_threshold=draw(st.booleans()),
        exit_patience=draw(st.integers(1, 3)),
        exit_counting=draw(st.sampled_from(["cumulative", "consecutive"])),
        shallow_renormalise=draw(st.booleans()),
    )


def _ref(name, model, inputs, spans, cfg):
    fam = family(name)
    return reference_forward(model, inputs["input_ids"], inputs.get("pixel_values"), cfg,
                             extra_inputs=fam.reference_inputs(inputs), spans=spans)


def _between(values, rank):
    """A threshold between two neighbours of the sorted ``values`` (or below / above them all)."""
    v = sorted(values)
    v = [v[0] - 1.0] + v + [v[-1] + 1.0]
    i = min(int(rank * (len(v) - 1)), len(v) - 2)
    return (v[i] + v[i + 1]) / 2


def _config(name, model, inputs, spans, d):
    d = dict(d)
    ranks = {k: d.pop(k) for k in ("layer_rank", "tokens_rank", "exit_rank")}
    base = VisiPrunerConfig(**d)
    if not spans or not base.stages:
        return base
    # the unpruned run (with the drawn shallow stage): min cos at every layer > K, norms there
    probe = VisiPrunerConfig(stages=tuple(s for s in base.stages if s == "shallow") + ("deep",),
                             shallow_layers=base.shallow_layers, shallow_renormalise=base.shallow_renormalise,
                             exit_threshold=1.0, exit_patience=len(model.model.language_model.layers))
    p = _ref(name, model, inputs, spans, probe)
    if not p.min_cos:  # K covers every layer
        return base
    cos = [min(max(c, -0.999), 0.999) for c in p.min_cos.values()]
    layer_threshold = min(max(_between(cos, ranks["layer_rank"]), -1.0), 1.0)
    fusion = next((li for li, c in sorted(p.min_cos.items()) if c < layer_threshold), max(p.min_cos))
    scores = p.norms[fusion] / p.output_norms[fusion] if base.relative_tokens_threshold else p.norms[fusion]
    tokens_threshold = max(_between(scores.tolist(), ranks["tokens_rank"]), 0.0)
    exit_threshold = min(max(_between(cos, ranks["exit_rank"]), -1.0), 1.0)
    return VisiPrunerConfig(**{**d, "layer_threshold": layer_threshold, "tokens_threshold": tokens_threshold,
                               "exit_threshold": exit_threshold})


def _check(name, prompt, d):
    model = _model(name)
    inputs, spans = prompt
    cfg = _config(name, model, inputs, spans, d)
    ref = _ref(name, model, inputs, spans, cfg)
    with visipruner.apply(model, cfg) as h:
        out = model(**inputs).logits[0]
    s = h.last_stats
    assert out.shape == ref.logits.shape
    torch.testing.assert_close(out, ref.logits, atol=1e-5, rtol=0)
    if not spans or not cfg.stages:  # nothing to prune: the model's own forward, untouched
        assert torch.equal(out, model(**inputs).logits[0]) and not s.pruning_applied
        return
    assert (s.fusion_layer, s.exit_layer) == (ref.fusion_layer, ref.exit_layer)
    assert s.critical_tokens == ref.critical_tokens
    assert s.visual_tokens_per_layer == ref.visual_tokens_per_layer
    assert s.num_images + s.num_frames == len(spans)


@BUDGET
@given(data=st.data())
def test_llava_fast_path_equals_reference_on_drawn_layouts(data):
    _check("llava", data.draw(prompts("llava")), data.draw(configs()))


@BUDGET
@given(data=st.data())
def test_qwen2_vl_fast_path_equals_reference_on_drawn_layouts(data):
    _check("qwen2_vl", data.draw(prompts("qwen2_vl")), data.draw(configs()))
