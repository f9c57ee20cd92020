"""Config validation, FLOPs accounting by hand, and clear errors that leave the model usable."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import visipruner
from visipruner import Schedule, VisiPrunerConfig
from visipruner.testing import random_prompt, tiny_llava

torch.set_grad_enabled(False)


# ------------------------------------------------------------------------------------ config
def test_config_json_round_trip():
    cfg = VisiPrunerConfig(stages=("shallow", "deep"), shallow_layers=4, layer_threshold=0.997,
                           tokens_threshold=0.35, exit_threshold=0.9985, exit_patience=3,
                           exit_counting="consecutive", shallow_renormalise=True)
    text = cfg.to_json()
    assert VisiPrunerConfig.from_json(text) == cfg
    assert json.loads(text)["stages"] == ["shallow", "deep"]
    assert VisiPrunerConfig.from_json(VisiPrunerConfig().to_json()) == VisiPrunerConfig()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"stages": ("shallow", "sideways")}, "stages"),
        ({"stages": "shallow"}, "stages"),
        ({"shallow_layers": 0}, "shallow_layers"),
        ({"shallow_layers": 2.5}, "shallow_layers"),
        ({"layer_threshold": 1.5}, "layer_threshold"),
        ({"layer_threshold": float("nan")}, "layer_threshold"),
        ({"tokens_threshold": -0.1}, "tokens_threshold"),
        ({"exit_threshold": -2}, "exit_threshold"),
        ({"exit_patience": 0}, "exit_patience"),
        ({"exit_counting": "sometimes"}, "exit_counting"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        VisiPrunerConfig(**kwargs)


def test_config_from_json_rejects_unknown_fields():
    with pytest.raises(ValueError, match="bogus"):
        VisiPrunerConfig.from_json('{"bogus": 1}')
    with pytest.raises(ValueError, match="invalid JSON"):
        VisiPrunerConfig.from_json("{")


# ------------------------------------------------------------------------------------- FLOPs
def test_flops_of_a_forced_schedule_equal_a_hand_computation():
    # d=64, 4 heads x 16 (q_dim 64), 2 kv heads (kv_dim 32), SwiGLU m=128, 8 layers
    model = tiny_llava(0, hidden=64, heads=4, kv_heads=2, intermediate=128, layers=8)
    inputs = random_prompt(model, seed=0, prefix=5, suffix=12)  # P=5 (0..4), V=16 (5..20), T=12 (21..32)
    assert inputs["input_ids"].shape[1] == 33
    cfg = VisiPrunerConfig(shallow_layers=2)
    sched = Schedule(fusion_layer=3, critical_tokens=[1, 4, 9], exit_layer=5)
    with visipruner.apply(model, cfg, schedule=sched) as h:
        model.generation_config.eos_token_id = None
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    s = h.last_stats

    per_token = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64) + 2 * 3 * 64 * 128  # projections + MLP = 73728
    attn = 2 * 64  # per (query, key) pair, for scores and again for the weighted sum

    # layer 0 (merge): rows 0..5 causal SDPA (21 pairs); the image's 16 rows: 16*5 earlier
    # text keys + 136 causal own keys; 12 text rows: scores on 22..33 keys (330), a.v on
    # 6..17 non-visual keys (138) + 1 merged vector each (12).
    l0 = 33 * per_token + attn * ((21 + 216 + 330) + (21 + 216 + 138 + 12))
    # layer 1 (disable): rows 0..20 causal (231 pairs); text rows: scores 330, a.v 138
    l1 = 33 * per_token + attn * ((231 + 330) + (231 + 138))
    full = lambda n: n * per_token + attn * 2 * (n * (n + 1) // 2)  # noqa: E731
    # layers 2, 3 full (33); fusion at 3 keeps 3 of 16: 20 tokens in 4, 5; exit at 5: 17 in 6, 7
    expected = l0 + l1 + 2 * full(33) + 2 * full(20) + 2 * full(17)
    assert s.visual_tokens_per_layer == [16, 16, 16, 16, 3, 3, 0, 0]
    assert s.prefill_flops == expected
    assert s.dense_prefill_flops == 8 * full(33)
    fastv = lambda n: 4 * n * 64 * 64 + 2 * n * n * 64 + 2 * n * 64 * 128  # noqa: E731
    assert s.prefill_flops_fastv == 4 * fastv(33) + 2 * fastv(20) + 2 * fastv(17)
    assert s.dense_prefill_flops_fastv == 8 * fastv(33)

    # first decode step: one query, 34 keys in an unpruned cache
    d0 = per_token + attn * (34 + (34 - 16 + 1))  # merge: scores on all, a.v on 18 text + 1 merged
    d1 = per_token + attn * (34 + (34 - 16))
    step = lambda keys: per_token + attn * 2 * keys  # noqa: E731
    assert s.decode_flops[0] == d0 + d1 + 2 * step(34) + 2 * step(21) + 2 * step(18)
    assert s.dense_decode_flops[0] == 8 * step(34)
    assert len(s.decode_flops) == 1


def test_influence_rows_are_counted():
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0)
    cfg = VisiPrunerConfig(stages=("middle",), shallow_layers=2, layer_threshold=-1.0)  # checks every layer > 2
    with visipruner.apply(model, cfg) as h:
        model(**inputs)
    n, m, q = 33, 16, 64
    checked = 8 - 3
    assert h.last_stats.prefill_flops - h.last_stats.dense_prefill_flops == checked * (4 * q * n + 8 * q * m)


# ------------------------------------------------------------------------------------ errors
def _check_usable(model, inputs, expected_logits):
    assert torch.equal(model(**inputs).logits, expected_logits)


def test_unsupported_model_class_lists_supported():
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        visipruner.apply(lm, VisiPrunerConfig())


def test_unsupported_attention_implementation():
    model = tiny_llava(0)
    model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="sdpa"):
        visipruner.apply(model, VisiPrunerConfig())


def test_a_refused_batch_leaves_the_model_usable():
    """Batches run (tests/test_batches.py); a right-padded one is refused and the model keeps working."""
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0)
    expected = model(**inputs).logits
    batch = {k: torch.cat([v, v]) for k, v in inputs.items()}
    batch["attention_mask"][1, -3:] = 0  # right padding
    with visipruner.apply(model, VisiPrunerConfig(shallow_layers=2)) as h:
        with pytest.raises(ValueError, match="left padding"):
            model(**batch)
        pruned = model(**inputs).logits  # still works
        assert h.last_stats.pruning_applied
        same = {k: torch.cat([v, v]) for k, v in inputs.items()}
        torch.testing.assert_close(model(**same).logits[1], pruned[0], atol=1e-5, rtol=0)
    _check_usable(model, inputs, expected)
    # with pruning disabled, batches are the model's own
    with visipruner.apply(model, VisiPrunerConfig(stages=())):
        assert torch.equal(model(**batch).logits[0], expected[0])
    assert pruned.shape == expected.shape


def test_image_token_count_mismatch_is_clear_and_model_stays_usable():
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0)
    expected = model(**inputs).logits
    cfg = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=0.0)
    with visipruner.apply(model, cfg) as h:
        bad = dict(inputs, input_ids=inputs["input_ids"][:, :-14])  # cuts into the image
        bad["attention_mask"] = torch.ones_like(bad["input_ids"])
        with pytest.raises(ValueError, match="[Ii]mage features and image tokens do not match"):
            model(**bad)
        model(**inputs)
        assert h.last_stats.fusion_layer == 3
        ref_stats = h.last_stats
    _check_usable(model, inputs, expected)
    assert ref_stats.visual_tokens_per_layer[-1] == 0


def test_a_left_padded_prompt_is_pruned_like_the_unpadded_one():
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0)
    padded = dict(inputs, input_ids=torch.cat([torch.zeros(1, 3, dtype=torch.long), inputs["input_ids"]], 1),
                  attention_mask=torch.cat([torch.zeros(1, 3, dtype=torch.long), inputs["attention_mask"]], 1))
    cfg = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=1e-3, exit_threshold=0.0)
    with visipruner.apply(model, cfg) as h:
        alone = model(**inputs).logits[0, -1]
        a = h.last_stats
        out = model(**padded).logits[0, -1]
        b = h.last_stats
    torch.testing.assert_close(out, alone, atol=1e-4, rtol=0)
    assert (a.fusion_layer, a.exit_layer, a.visual_tokens_per_layer) == (b.fusion_layer, b.exit_layer,
                                                                         b.visual_tokens_per_layer)
    assert a.exit_layer is not None and b.padding_flops > 0


def test_apply_twice_is_refused_and_remove_is_idempotent():
    model = tiny_llava(0)
    h = visipruner.apply(model, VisiPrunerConfig())
    with pytest.raises(RuntimeError, match="already"):
        visipruner.apply(model, VisiPrunerConfig())
    h.remove()
    h.remove()
    visipruner.apply(model, VisiPrunerConfig()).remove()


def test_schedule_validation():
    with pytest.raises(ValueError, match="exit_layer"):
        Schedule(fusion_layer=5, critical_tokens=[], exit_layer=4)
    model = tiny_llava(0)
    inputs = random_prompt(model, seed=0)
    with visipruner.apply(model, VisiPrunerConfig(), schedule=Schedule(3, [99], None)):
        with pytest.raises(ValueError, match="out of range"):
            model(**inputs)


def test_recommended_config_falls_back_to_scaled_paper_defaults_with_a_warning():
    from visipruner.testing import tiny_llava

    model = tiny_llava(0, layers=16)
    with pytest.warns(UserWarning, match="calibrate"):
        cfg = visipruner.recommended_config(model)
    assert cfg == visipruner.paper_defaults(16) and cfg.shallow_layers == 3  # 6 of 32 -> 3 of 16
    stored = visipruner.VisiPrunerConfig(stages=("middle", "deep"), layer_threshold=0.98)
    model.config.visipruner_config = stored.to_dict()
    assert visipruner.recommended_config(model) == stored  # a calibrated config wins, no warning
