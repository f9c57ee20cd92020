"""Decisions are taken once per prompt, on the prompt, however transformers drives the model:
assisted and prompt-lookup decoding equal greedy decoding, ``use_cache=False`` equals cached
generation, ``last_stats`` describes the prompt's prefill, and a chat resumed from its cache either
continues the pruned prompt exactly (text) or refuses new visual tokens."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import visipruner
from visipruner import FastVConfig, Schedule, VisiPrunerConfig

from families import family
from reference import reference_forward

torch.set_grad_enabled(False)

K = 2  # shallow layers / FastV's layer
STEPS = 6
FAMILIES = ("llava", "qwen2_vl")  # 1-D RoPE and M-RoPE
METHODS = ("thresholds", "schedule", "fastv")


def _setup(name, method, seed=0):
    """A tiny model, its prompt and a config under which the decisions depend on the deciding token
    (``thresholds``: fusion at the first checked layer keeping the visual tokens whose contribution is
    above the median, exit two layers on; ``fastv``: top half by the last token's attention) or not
    (``schedule``: forced)."""
    fam = family(name)
    model = fam.build(seed, "sdpa", 6)
    model.generation_config.eos_token_id = None  # exactly STEPS greedy steps
    inputs, spans = fam.prompt(model, seed, "one")
    if method == "fastv":
        return fam, model, inputs, spans, FastVConfig(layer=K, keep_ratio=0.5), None
    if method == "schedule":
        n_vis = sum(e - s for s, e in spans)
        cfg = VisiPrunerConfig(shallow_layers=K)
        return fam, model, inputs, spans, cfg, Schedule(K + 1, list(range(0, n_vis, 2)), K + 3)
    probe = VisiPrunerConfig(shallow_layers=K, layer_threshold=1.0, tokens_threshold=0.0)
    ref = reference_forward(model, inputs["input_ids"], inputs.get("pixel_values"), probe,
                            extra_inputs=fam.reference_inputs(inputs), spans=spans)
    norms = ref.norms[K + 1].sort().values
    mid = len(norms) // 2
    cfg = VisiPrunerConfig(shallow_layers=K, layer_threshold=1.0, exit_threshold=0.0, exit_patience=2,
                           tokens_threshold=float(norms[mid - 1] + norms[mid]) / 2)
    return fam, model, inputs, spans, cfg, None


def _generate(model, inputs, **kw):
    return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, **kw)


def _prompt_stats(stats):
    """Everything ``PruneStats`` says about the prompt's prefill (not the decode steps after it)."""
    d = stats.to_dict()
    d.pop("decode_flops"), d.pop("dense_decode_flops")
    return d


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", FAMILIES)
def test_assisted_and_prompt_lookup_decoding_equal_greedy(name, method):
    fam, model, inputs, _, cfg, schedule = _setup(name, method)
    smaller = fam.build(1, "sdpa", 2)  # an unpruned assistant of the same family, a third of the depth
    with visipruner.apply(model, cfg, schedule=schedule) as h:
        greedy = _generate(model, inputs)
        prompt = _prompt_stats(h.last_stats)
        assert h.last_stats.pruning_applied and len(h.last_stats.decode_flops) == STEPS - 1
        for how in ({"assistant_model": model}, {"assistant_model": smaller}, {"prompt_lookup_num_tokens": 3}):
            out = _generate(model, inputs, **how)
            assert torch.equal(out, greedy), how
            # decisions on the prompt's last token, not on the first draft
            assert _prompt_stats(h.last_stats) == prompt, how
    if method == "thresholds":
        assert prompt["fusion_layer"] == K + 1 and prompt["exit_layer"] == K + 3
        assert 0 < len(prompt["critical_tokens"]) < prompt["num_visual_tokens"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", FAMILIES)
def test_uncached_generation_equals_cached(name, method):
    fam, model, inputs, _, cfg, schedule = _setup(name, method)
    with visipruner.apply(model, cfg, schedule=schedule) as h:
        cached = _generate(model, inputs)
        prompt = _prompt_stats(h.last_stats)
        cached_decode = h.last_stats.decode_flops
        uncached = _generate(model, inputs, use_cache=False)
        stats = h.last_stats
        # a plain forward call (its own pixels) is a new prompt, decided on its own last token
        n = inputs["input_ids"].shape[1]
        model(**fam.extend(inputs, uncached[:, n:]), use_cache=False)
        assert h.last_stats.prompt_length == uncached.shape[1]
    assert torch.equal(uncached, cached)
    assert _prompt_stats(stats) == prompt  # the prompt's prefill, not the last recomputation
    # each step recomputed the prompt and the tokens so far: more work than the cached decode step
    assert len(stats.decode_flops) == STEPS - 1
    assert all(u > c for u, c in zip(stats.decode_flops, cached_decode))


def test_uncached_generation_keeps_the_prompt_stats_with_nothing_to_prune():
    fam = family("llava")
    model = fam.build(0, "sdpa", 4)
    model.generation_config.eos_token_id = None
    inputs, _ = fam.prompt(model, 0, "one")
    vis = visipruner.adapters.get_adapter(model).visual_mask(inputs["input_ids"][0])
    n = inputs["input_ids"].shape[1]
    for cfg, prompt in ((VisiPrunerConfig(stages=()), inputs), (FastVConfig(layer=K), {"input_ids": inputs["input_ids"][:, ~vis]})):
        with visipruner.apply(model, cfg) as h:
            _generate(model, prompt, use_cache=False)
        assert h.last_stats.prompt_length == prompt["input_ids"].shape[1] and not h.last_stats.pruning_applied
    assert n > int((~vis).sum())


def test_uncached_batch_generation_equals_cached():
    fam = family("llava")
    model = fam.build(0, "sdpa", 6)
    model.generation_config.eos_token_id = None
    from visipruner.evaluate import collate_prompts

    batch = collate_prompts([fam.prompt(model, 1, "one")[0], fam.prompt(model, 2, "two")[0]])
    cfg = FastVConfig(layer=K, keep_ratio=0.5)
    with visipruner.apply(model, cfg) as h:
        cached = _generate(model, batch)
        prompts = [_prompt_stats(s) for s in h.batch_stats]
        uncached = _generate(model, batch, use_cache=False)
        assert [_prompt_stats(s) for s in h.batch_stats] == prompts
    assert torch.equal(uncached, cached)


def _keep_recorder(ratio):
    """FastV's rule for the reference (top ``ratio`` by the last token's mean attention at layer K),
    recording the visual ids it keeps."""
    kept = []

    def rule(layer, probs, ids, hidden):
        if layer != K:
            return None
        keep = ids[probs.mean(0).argsort(descending=True, stable=True)[: math.ceil(ratio * len(ids))]]
        kept.extend(sorted(keep.tolist()))
        return keep

    return rule, kept


def _replayed(fam, model, inputs, cfg, stats):
    """The prompt's decisions as a schedule the reference replays (FastV's from the reference itself)."""
    if isinstance(cfg, FastVConfig):
        rule, kept = _keep_recorder(cfg.keep_ratio)
        reference_forward(model, inputs["input_ids"], inputs.get("pixel_values"), VisiPrunerConfig(stages=()),
                          drop_rule=rule, extra_inputs=fam.reference_inputs(inputs))
        return VisiPrunerConfig(stages=("middle",)), Schedule(K, kept, None)
    return cfg, Schedule(stats.fusion_layer, stats.critical_tokens, stats.exit_layer)


@pytest.mark.parametrize("method", ("thresholds", "fastv"))
@pytest.mark.parametrize("name", FAMILIES)
def test_text_follow_up_turn_continues_the_pruned_prompt(name, method):
    """A second turn (text) resumed from turn one's cache: every token equals the slow reference over the
    whole conversation with turn one's prompt decisions replayed (turn two is text after the prompt)."""
    fam, model, inputs, spans, cfg, schedule = _setup(name, method)
    cache = DynamicCache(config=model.config.get_text_config())
    question = torch.randint(4, 100, (1, 5), generator=torch.Generator().manual_seed(9))
    n = inputs["input_ids"].shape[1]
    with visipruner.apply(model, cfg, schedule=schedule) as h:
        seq = _generate(model, inputs, past_key_values=cache)
        stats = h.last_stats
        turn2 = fam.extend(inputs, torch.cat([seq[:, n:], question], 1))
        turn2 = {k: v for k, v in turn2.items() if k not in ("pixel_values", "image_grid_thw")}
        _generate(model, inputs)  # another prompt in between: the cache still knows its own
        between = h.last_stats
        out = _generate(model, turn2, past_key_values=cache)
        assert h.last_stats is between  # a continuation is no new prompt
        assert len(stats.decode_flops) == 2 * (STEPS - 1) + 1  # turn two's steps count as turn one's decode steps
    with visipruner.apply(model, cfg, schedule=schedule), pytest.raises(ValueError, match="another visipruner handle"):
        _generate(model, turn2, past_key_values=cache)
    ref_cfg, replay = _replayed(fam, model, inputs, cfg, stats)
    m = turn2["input_ids"].shape[1]
    for t in range(STEPS):
        ext = fam.extend(inputs, out[:, n: m + t])
        ref = reference_forward(model, ext["input_ids"], inputs.get("pixel_values"), ref_cfg, schedule=replay,
                                extra_inputs=fam.reference_inputs(ext), spans=spans)
        assert int(ref.logits[-1].argmax()) == int(out[0, m + t]), t


@pytest.mark.parametrize("turn_one_image", (True, False))
@pytest.mark.parametrize("name", FAMILIES)
def test_image_in_a_later_turn_is_refused(name, turn_one_image):
    """New visual tokens arriving in a cache that holds earlier turns are never silently left unpruned."""
    fam = family(name)
    model = fam.build(0, "sdpa", 4)
    model.generation_config.eos_token_id = None
    first, _ = fam.prompt(model, 0, "one")
    if not turn_one_image:
        vis = visipruner.adapters.get_adapter(model).visual_mask(first["input_ids"][0])
        first = {"input_ids": first["input_ids"][:, ~vis]}
    second, _ = fam.prompt(model, 1, "one")
    cache = DynamicCache(config=model.config.get_text_config())
    with visipruner.apply(model, FastVConfig(layer=K, keep_ratio=0.5)):
        model(**first, past_key_values=cache, use_cache=True)
        past = cache.get_seq_length()
        with pytest.raises(ValueError, match="visual tokens arrive in a KV cache that already holds .* no past_key_values"):
            model(**second, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == past  # refused before anything ran


def test_cache_cropped_into_the_pruned_tokens_is_refused():
    """Cropping a cache back into the prompt's closing text is fine (an assistant re-feeds the prompt's
    last token); cropping into the tokens that pruned layers hold differently is refused."""
    fam = family("llava")
    model = fam.build(0, "sdpa", 4)
    inputs, spans = fam.prompt(model, 0, "one")
    n, end = inputs["input_ids"].shape[1], spans[-1][1]
    cache = DynamicCache(config=model.config.get_text_config())
    with visipruner.apply(model, FastVConfig(layer=1, keep_ratio=0.5)):
        prefill = model(**inputs, past_key_values=cache, use_cache=True).logits
        cache.crop(end - n)  # back to the image's end: the closing text is re-fed, as in the prefill
        refed = model(input_ids=inputs["input_ids"][:, end:], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(refed, prefill[:, -(n - end):], atol=1e-5, rtol=0)
        cache.crop(end - n)  # again, re-feeding only part of the closing text (the queries stop before its end)
        assert n - end >= 3
        part = model(input_ids=inputs["input_ids"][:, end:end + 2], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(part, prefill[:, -(n - end):][:, :2], atol=1e-5, rtol=0)
        model(input_ids=inputs["input_ids"][:, end + 2:], past_key_values=cache, use_cache=True)
        cache.crop(end - 1 - n)
        with pytest.raises(ValueError, match="cropped into the pruned tokens"):
            model(input_ids=inputs["input_ids"][:, end - 1:], past_key_values=cache, use_cache=True)
