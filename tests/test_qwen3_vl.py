"""Qwen3-VL's deepstack under pruning: tokens dropped before or during the layers that add vision
features (layers 0-4 of the tiny model) get none; the tokens still present get theirs. Compared
with the slow reference, which adds ``deepstack[li]`` after layer ``li`` to the tokens it holds."""

from __future__ import annotations

import pytest
import torch

import visipruner
from visipruner import FastVConfig, Schedule, VisiPrunerConfig

from families import family
from reference import language_model_inputs, reference_forward

torch.set_grad_enabled(False)

FAM = family("qwen3_vl")
DEEPSTACK_LAYERS = 5  # tiny_qwen_vl(version="3"): features of vision blocks 0-4 after LM layers 0-4


def _ref(model, inputs, spans, cfg, **kw):
    return reference_forward(model, inputs["input_ids"], inputs.get("pixel_values"), cfg,
                             extra_inputs=FAM.reference_inputs(inputs), spans=spans, **kw)


def test_tiny_model_has_deepstack_where_the_tests_prune():
    model = FAM.build(0, "sdpa", 8)
    inputs, _ = FAM.prompt(model, 0, "video")
    got = language_model_inputs(model, inputs["input_ids"], inputs.get("pixel_values"), **FAM.reference_inputs(inputs))
    ds = got["deepstack_visual_embeds"]
    assert len(ds) == DEEPSTACK_LAYERS
    # as large as the hidden states they are added to: leaving them out would show
    assert all(float(d.norm(dim=-1).mean()) > 0.5 * float(got["inputs_embeds"].norm(dim=-1).mean()) for d in ds)


@pytest.mark.parametrize("layout", ["two", "video"])
@pytest.mark.parametrize("layer", [0, 1])
def test_fastv_before_the_deepstack_layers_end(layout, layer):
    model = FAM.build(4, "sdpa", 8)
    inputs, spans = FAM.prompt(model, 4, layout)

    def rule(li, probs, ids, hidden):
        if li != layer:
            return None
        return ids[probs.float().mean(0).argsort(descending=True, stable=True)[: int(round(0.5 * len(ids)))]]

    ref = _ref(model, inputs, spans, VisiPrunerConfig(stages=()), drop_rule=rule)
    with visipruner.apply(model, FastVConfig(layer=layer, keep_ratio=0.5)) as h:
        out = model(**inputs).logits[0]
    per_layer = h.last_stats.visual_tokens_per_layer
    assert per_layer == ref.visual_tokens_per_layer
    assert per_layer[layer + 1] < per_layer[0] and layer + 1 < DEEPSTACK_LAYERS  # pruned inside deepstack
    torch.testing.assert_close(out, ref.logits, atol=1e-5, rtol=0)


def _fusion_at_layer_2(model, inputs, spans):
    """VisiPruner without the shallow stage, K=1: fusion at layer 2 keeps about half the tokens,
    exit after layer 4 drops the rest; layers 3 and 4 add deepstack to the critical tokens only."""
    probe = VisiPrunerConfig(stages=("middle",), shallow_layers=1, layer_threshold=1.0, tokens_threshold=0.0)
    norms = _ref(model, inputs, spans, probe).norms[2].sort().values
    mid = len(norms) // 2
    return VisiPrunerConfig(stages=("middle", "deep"), shallow_layers=1, layer_threshold=1.0,
                            tokens_threshold=float(norms[mid - 1] + norms[mid]) / 2, exit_threshold=0.0,
                            exit_patience=2)


@pytest.mark.parametrize("layout", ["one", "video"])
def test_visipruner_pruning_inside_deepstack_matches_reference(layout):
    model = FAM.build(5, "sdpa", 8)
    inputs, spans = FAM.prompt(model, 5, layout)
    cfg = _fusion_at_layer_2(model, inputs, spans)
    ref = _ref(model, inputs, spans, cfg)
    with visipruner.apply(model, cfg) as h:
        out = model(**inputs).logits[0]
    s = h.last_stats
    assert (s.fusion_layer, s.exit_layer) == (ref.fusion_layer, ref.exit_layer) == (2, 4)
    assert s.critical_tokens == ref.critical_tokens and 0 < len(s.critical_tokens) < s.num_visual_tokens
    assert s.visual_tokens_per_layer == ref.visual_tokens_per_layer
    torch.testing.assert_close(out, ref.logits, atol=1e-5, rtol=0)


def test_cached_generation_with_pruning_inside_deepstack():
    """generate() hands the model precomputed vision features (deepstack included) and 4-row
    position ids; decode steps get no deepstack. Greedy tokens == recomputing the pruned prompt."""
    model = FAM.build(6, "sdpa", 8)
    inputs, spans = FAM.prompt(model, 6, "video")
    cfg = _fusion_at_layer_2(model, inputs, spans)
    model.generation_config.eos_token_id = None
    with visipruner.apply(model, cfg) as h:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        stats = h.last_stats
    assert stats.fusion_layer == 2 and stats.num_frames == 3
    schedule = Schedule(stats.fusion_layer, stats.critical_tokens, stats.exit_layer)
    n = inputs["input_ids"].shape[1]
    for t in range(4):
        full_inputs = FAM.extend(inputs, out.sequences[:, n : n + t])
        ref = _ref(model, full_inputs, spans, cfg, schedule=schedule).logits[-1]
        torch.testing.assert_close(out.logits[t][0], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_text_only_prompt_and_disabled_run_untouched(impl):
    model = FAM.build(7, impl, 4)
    inputs, _ = FAM.prompt(model, 7, "two")
    text = {"input_ids": torch.tensor([[1, 20, 30, 40, 50, 60]])}
    logits, text_logits = model(**inputs).logits, model(**text).logits
    with visipruner.apply(model, FastVConfig(layer=0, keep_ratio=0.5)):
        assert torch.equal(model(**text).logits, text_logits)
    with visipruner.apply(model, VisiPrunerConfig(stages=())):
        assert torch.equal(model(**inputs).logits, logits)


def test_visionzip_names_qwen3_vl():
    with pytest.raises(ValueError, match="Qwen3-VL"):
        visipruner.apply(FAM.build(0, "sdpa", 2), visipruner.VisionZipConfig())
