"""An applied model is still a transformers model: the user's config, attention switches, deepcopy,
garbage collection, grad mode, gradient checkpointing, labels, output_attentions / hidden_states."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F

import visipruner
from visipruner import Schedule, VisiPrunerConfig
from visipruner.attention import repeat_kv
from visipruner.testing import random_prompt, tiny_llava

from reference import reference_forward

CFG = VisiPrunerConfig(stages=("shallow", "middle", "deep"), shallow_layers=2)
SCHEDULE = Schedule(fusion_layer=3, critical_tokens=[0, 3], exit_layer=5)


def _pruned(seed=0, impl="sdpa", images=2, **prompt):
    model = tiny_llava(seed, attn_implementation=impl)
    inputs = random_prompt(model, seed=seed, images=images, **prompt)
    return model, inputs


# ----------------------------------------------------------------------- the user's config
def test_apply_leaves_the_users_config_and_other_models_alone():
    model, inputs = _pruned()
    config = model.config
    before = (config._attn_implementation, config.text_config._attn_implementation)
    twin = type(model)(config)  # built from the same config object
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        dense = twin(**inputs).logits
    handle = visipruner.apply(model, CFG, schedule=SCHEDULE)
    assert (config._attn_implementation, config.text_config._attn_implementation) == before == ("sdpa", "sdpa")
    attention = model.model.language_model.layers[0].self_attn
    assert attention.config._attn_implementation == "sdpa"  # what transformers' own checks read between calls
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, dense)  # the twin is not pruned
        assert model(**inputs).logits.shape[1] < dense.shape[1]  # the applied model is
    other = visipruner.apply(twin, CFG, schedule=SCHEDULE)  # and can be applied on its own
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, model(**inputs).logits)
    other.remove()
    handle.remove()
    assert (config._attn_implementation, config.text_config._attn_implementation) == before


def test_switching_between_sdpa_and_eager_after_apply_is_honoured():
    model, inputs = _pruned()
    eager_model, _ = _pruned(impl="eager")
    h_eager = visipruner.apply(eager_model, CFG, schedule=SCHEDULE)
    handle = visipruner.apply(model, CFG, schedule=SCHEDULE)
    model.set_attn_implementation("eager")
    assert model.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        got, want = model(**inputs).logits, eager_model(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert handle.last_stats.tokens_per_layer == h_eager.last_stats.tokens_per_layer
    # the masks the runtime builds follow the switch too (a batch with padding, eager's additive masks)
    batch = {k: torch.cat([v, v]) for k, v in inputs.items()}
    batch["attention_mask"][0, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, eager_model(**batch).logits, rtol=0, atol=1e-5)


def test_an_attention_implementation_pruning_cannot_route_is_refused_not_half_applied():
    model, inputs = _pruned()
    handle = visipruner.apply(model, CFG, schedule=SCHEDULE)
    model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"attention implementation is now 'flex_attention'.*set_attn_implementation"):
        model(**inputs)
    model.config.text_config._attn_implementation = "sdpa"
    with torch.no_grad():
        model(**inputs)
    assert handle.last_stats.tokens_per_layer[-1] < handle.last_stats.prompt_length
    # with pruning disabled nothing is dropped, so nothing needs routing: any implementation runs
    handle.remove()
    disabled = visipruner.apply(model, VisiPrunerConfig(stages=()))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        model(**inputs)
    disabled.remove()


# ------------------------------------------------------------------- deepcopy and garbage
def test_deepcopy_gives_a_pruned_copy_with_its_own_handle():
    model, inputs = _pruned()
    handle = visipruner.apply(model, CFG, schedule=SCHEDULE)
    with torch.no_grad():
        want = model(**inputs).logits
    clone = copy.deepcopy(model)
    theirs = visipruner.handle_of(clone)
    assert theirs is not None and theirs is not handle and theirs.model is clone
    assert visipruner.handle_of(model) is handle
    with torch.no_grad():
        assert torch.equal(clone(**inputs).logits, want)
    assert theirs.last_stats.tokens_per_layer == handle.last_stats.tokens_per_layer
    theirs.remove()  # the copy goes back to dense; the original stays pruned
    with torch.no_grad():
        assert clone(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
        assert torch.equal(model(**inputs).logits, want)


def test_an_applied_model_is_garbage_collected_without_remove():
    model, inputs = _pruned()
    visipruner.apply(model, CFG, schedule=SCHEDULE)  # the model keeps its handle alive
    with torch.no_grad():
        model(**inputs)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


# ---------------------------------------------------------------------- grad mode, training
def test_no_warning_from_the_library_in_grad_mode():
    model, inputs = _pruned()
    visipruner.apply(model, VisiPrunerConfig(stages=("shallow", "middle", "deep"), shallow_layers=1,
                                             layer_threshold=1.0, tokens_threshold=0.0))  # decisions measured
    with torch.enable_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**inputs).logits.sum().backward()
    ours = [w for w in caught if "visipruner" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


@pytest.mark.parametrize("batched", [False, True])
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_backward(batched):
    grads = []
    for checkpointing in (False, True):
        model, inputs = _pruned()
        if batched:
            inputs = {k: torch.cat([v, v]) for k, v in inputs.items()}
            inputs["attention_mask"][0, :3] = 0
        visipruner.apply(model, CFG, schedule=SCHEDULE)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with torch.enable_grad():
            model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------- the last token
def test_a_prompt_of_visual_tokens_only_keeps_its_last_token():
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0, prefix=1, suffix=0)
    inputs = {"input_ids": inputs["input_ids"][:, 1:], "pixel_values": inputs["pixel_values"],
              "attention_mask": inputs["attention_mask"][:, 1:]}  # 16 image tokens, nothing else
    handle = visipruner.apply(model, CFG, schedule=Schedule(fusion_layer=2, critical_tokens=[], exit_layer=None))
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert handle.last_stats.tokens_per_layer[-1] == 1
    assert handle.last_stats.layer_positions[-1].tolist() == [15]


def test_a_prompt_ending_in_visual_tokens_keeps_its_last_token_as_the_reference_says():
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=1, suffix=0)  # text, then 16 image tokens at the end
    ref = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], CFG, schedule=SCHEDULE)
    handle = visipruner.apply(model, CFG, schedule=SCHEDULE)
    with torch.no_grad():
        got = model(**inputs).logits[0]
    assert handle.last_stats.layer_positions[-1].tolist() == ref.positions.tolist() == [0, 1, 2, 3, 4, 20]
    assert handle.last_stats.visual_tokens_per_layer == ref.visual_tokens_per_layer
    torch.testing.assert_close(got, ref.logits, rtol=1e-4, atol=1e-4)
    # the same as a schedule that keeps the last visual token on purpose, without an exit
    keep_last = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], CFG,
                                  schedule=Schedule(fusion_layer=3, critical_tokens=[0, 3, 15], exit_layer=None))
    spared = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], CFG,
                               schedule=Schedule(fusion_layer=3, critical_tokens=[0, 3], exit_layer=None))
    torch.testing.assert_close(spared.logits, keep_last.logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- labels
def _labels(ids):
    labels = ids.clone()
    labels[labels == 3] = -100  # image tokens, as a processor masks them
    return labels


def test_labels_give_the_reference_loss_over_the_kept_tokens():
    model, inputs = _pruned()
    labels = _labels(inputs["input_ids"])
    ref = reference_forward(model, inputs["input_ids"], inputs["pixel_values"], CFG, schedule=SCHEDULE)
    handle = visipruner.apply(model, CFG, schedule=SCHEDULE)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    targets = F.pad(labels, (0, 1), value=-100)[0, 1:][ref.positions]  # position p predicts labels[p + 1]
    want = F.cross_entropy(ref.logits.float(), targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)
    assert out.logits.shape[1] == len(ref.positions) < labels.shape[1]
    assert handle.last_stats.layer_positions[-1].tolist() == ref.positions.tolist()
    # tuple outputs carry it first, as transformers does
    with torch.no_grad():
        assert torch.equal(model(**inputs, labels=labels, return_dict=False)[0], out.loss)


def test_labels_in_a_batch_count_every_rows_kept_targets_once():
    model, inputs = _pruned()
    other = random_prompt(model, seed=5, images=2, prefix=3)
    handle = visipruner.apply(model, CFG, schedule=SCHEDULE)
    rows, alone = [inputs, other], []
    for row in rows:
        with torch.no_grad():
            logits = model(**row).logits[0]
        targets = F.pad(_labels(row["input_ids"]), (0, 1), value=-100)[0, 1:][handle.last_stats.layer_positions[-1]]
        alone.append(F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum"))
        alone.append((targets != -100).sum())
    n = max(r["input_ids"].shape[1] for r in rows)
    pad = [n - r["input_ids"].shape[1] for r in rows]
    batch = {"input_ids": torch.cat([F.pad(r["input_ids"], (p, 0)) for r, p in zip(rows, pad)]),
             "attention_mask": torch.cat([F.pad(r["attention_mask"], (p, 0)) for r, p in zip(rows, pad)]),
             "pixel_values": torch.cat([r["pixel_values"] for r in rows])}
    labels = torch.cat([F.pad(_labels(r["input_ids"]), (p, 0), value=-100) for r, p in zip(rows, pad)])
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss
    torch.testing.assert_close(loss, (alone[0] + alone[2]) / (alone[1] + alone[3]), rtol=1e-5, atol=1e-5)


def test_labels_with_pruning_disabled_are_the_models_own_loss():
    model, inputs = _pruned()
    labels = _labels(inputs["input_ids"])
    with torch.no_grad():
        want = model(**inputs, labels=labels).loss
    visipruner.apply(model, VisiPrunerConfig(stages=()))
    with torch.no_grad():
        assert torch.equal(model(**inputs, labels=labels).loss, want)


# ---------------------------------------------------- output_attentions / output_hidden_states
def test_output_attentions_has_one_map_per_layer_the_probabilities_each_layer_used():
    for renormalise in (False, True):
        cfg = VisiPrunerConfig(stages=("shallow", "middle", "deep"), shallow_layers=2, shallow_renormalise=renormalise)
        model, inputs = _pruned(impl="eager")
        handle = visipruner.apply(model, cfg, schedule=SCHEDULE)
        lm = model.model.language_model
        seen = {}
        for i, layer in enumerate(lm.layers):
            layer.self_attn.register_forward_hook(
                lambda m, a, kw, out, i=i: seen.__setitem__(i, (kw["hidden_states"], out[0])), with_kwargs=True)
        with torch.no_grad():
            out = model(**inputs, output_attentions=True, output_hidden_states=True)
        stats = handle.last_stats
        assert len(out.attentions) == len(lm.layers) and len(out.hidden_states) == len(lm.layers) + 1
        for i, weights in enumerate(out.attentions):
            n = len(stats.layer_positions[i])
            assert weights.shape[-2:] == (n, n) and out.hidden_states[i + 1].shape[1] == n
            # the map is what the layer attended with: weights @ V through o_proj gives its output
            hidden, output = seen[i]
            attn = lm.layers[i].self_attn
            v = attn.v_proj(hidden).view(*hidden.shape[:-1], -1, attn.head_dim).transpose(1, 2)
            mixed = (weights @ repeat_kv(v, attn.num_key_value_groups)).transpose(1, 2).reshape(*hidden.shape[:-1], -1)
            torch.testing.assert_close(attn.o_proj(mixed), output, rtol=1e-5, atol=1e-5)
        assert stats.method.get("shallow_layers", 2) and out.attentions[0][0, :, -1].sum(-1).allclose(
            torch.ones(out.attentions[0].shape[1]))  # the last text row keeps its whole mass at layer 0 (merge)


def test_generate_output_attentions_has_one_map_per_layer_at_every_step():
    model, inputs = _pruned(impl="eager")
    handle = visipruner.apply(model, CFG, schedule=SCHEDULE)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_attentions=True,
                         return_dict_in_generate=True)
    layers = len(model.model.language_model.layers)
    assert [len(step) for step in out.attentions] == [layers] * 3
    for i, step_map in enumerate(out.attentions[1]):  # the first decode step: its query over the cache and itself
        assert step_map.shape[-2:] == (1, handle.last_stats.tokens_per_layer[i] + 1)


def test_a_batchs_decode_attention_maps_are_each_rows_own():
    model, inputs = _pruned(impl="eager")
    other = random_prompt(model, seed=5, images=2, prefix=3)
    handle = visipruner.apply(model, CFG, schedule=SCHEDULE)
    rows, alone = [inputs, other], []
    for row in rows:
        out = model.generate(**row, max_new_tokens=2, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
        alone.append(out.attentions[1])
    n = max(r["input_ids"].shape[1] for r in rows)
    batch = {"input_ids": torch.cat([F.pad(r["input_ids"], (n - r["input_ids"].shape[1], 0)) for r in rows]),
             "attention_mask": torch.cat([F.pad(r["attention_mask"], (n - r["input_ids"].shape[1], 0)) for r in rows]),
             "pixel_values": torch.cat([r["pixel_values"] for r in rows])}
    out = model.generate(**batch, max_new_tokens=2, do_sample=False, output_attentions=True,
                         return_dict_in_generate=True)
    assert len(out.attentions[1]) == len(model.model.language_model.layers)
    for i, step_map in enumerate(out.attentions[1]):
        for r in range(2):
            own = alone[r][i][0]
            torch.testing.assert_close(step_map[r, :, :, -own.shape[-1]:], own, rtol=1e-5, atol=1e-6)
            assert not step_map[r, :, :, : step_map.shape[-1] - own.shape[-1]].any()  # padding and repacking slots


def test_deepcopy_of_qwen3_vl_keeps_its_deepstack_hooks_its_own():
    from visipruner.testing import qwen_vl_prompt, tiny_qwen_vl

    model = tiny_qwen_vl(0, version="3")
    inputs, _ = qwen_vl_prompt(model, seed=0)
    handle = visipruner.apply(model, CFG, schedule=SCHEDULE)
    with torch.no_grad():
        want = model(**inputs).logits
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(**inputs).logits, want)
    assert visipruner.handle_of(clone).last_stats.tokens_per_layer == handle.last_stats.tokens_per_layer
    visipruner.handle_of(clone).remove()  # the original's hooks stay, and still add its deepstack features
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)

