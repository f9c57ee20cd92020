"""Batches: every row of a left-padded batch is pruned exactly as it is alone."""

from __future__ import annotations

import pytest
import torch

import visipruner
from visipruner import FastVConfig, VisiPrunerConfig, VisionZipConfig

from families import family
from visipruner.evaluate import collate_prompts as collate

torch.set_grad_enabled(False)

def text_only(model, p: dict) -> dict:
    """The prompt's text without its visual tokens (a row with nothing to prune)."""
    from visipruner.adapters import get_adapter

    ids = p["input_ids"][:, ~get_adapter(model).visual_mask(p["input_ids"][0])]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _generate(model, inputs, steps):
    model.generation_config.eos_token_id = None
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)  # (steps, batch, vocab)


def _rows(name):
    fam = family(name)
    model = fam.build(0, "sdpa", 8)
    a, _ = fam.prompt(model, 1, "one")
    b, _ = fam.prompt(model, 2, fam.layouts[1])
    c, _ = fam.prompt(model, 3, "one")
    return model, [a, b, text_only(model, c)]  # different lengths; the last row has no visual token


# families whose per-image inputs concatenate across prompts (LLaVA-NeXT and Idefics3 processors pad
# their tile / sub-image axes when batching, which these in-process prompt makers do not)
@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "gemma3", "internvl"])
@pytest.mark.parametrize("method", ["visipruner", "fastv"])
def test_each_row_is_pruned_as_if_alone(name, method):
    model, prompts = _rows(name)
    cfg = (FastVConfig(layer=2, keep_ratio=0.5) if method == "fastv" else
           VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=1e-3, exit_threshold=0.0))
    steps = 5
    alone = []
    with visipruner.apply(model, cfg) as h:
        for p in prompts:
            seq, logits = _generate(model, p, steps)
            alone.append((seq[0, p["input_ids"].shape[1]:], logits[:, 0], h.last_stats))
        batch = collate(prompts)
        seq, logits = _generate(model, batch, steps)
        stats = h.batch_stats
    n = batch["input_ids"].shape[1]
    assert len(stats) == len(prompts) and h.last_stats is stats[0]
    for r, (a_seq, a_logits, a_stats) in enumerate(alone):
        assert torch.equal(seq[r, n:], a_seq), r
        torch.testing.assert_close(logits[:, r], a_logits, atol=1e-4, rtol=0, msg=f"row {r}")
        s = stats[r]
        for key in ("fusion_layer", "exit_layer", "critical_tokens", "visual_tokens_per_layer", "tokens_per_layer",
                    "prefill_flops", "num_images", "pruning_applied"):
            assert getattr(s, key) == getattr(a_stats, key), (r, key)
        assert s.decode_flops == a_stats.decode_flops, r
    assert stats[0].visual_tokens_per_layer[-1] < stats[0].num_visual_tokens  # pruning happened
    assert stats[2].padding_flops > 0 and not stats[2].pruning_applied  # the short text-only row was padded


def test_batch_with_no_row_pruned_and_every_row_pruned_to_nothing():
    model, prompts = _rows("llava")
    prompts = prompts[:2]
    batch = collate(prompts)
    dense = model(**batch).logits
    with visipruner.apply(model, VisiPrunerConfig(stages=("middle", "deep"), shallow_layers=2, layer_threshold=-1.0)) as h:
        assert torch.equal(model(**batch).logits, dense)
    assert all(s.fusion_layer is None for s in h.batch_stats)
    everything = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=1e9, exit_threshold=0.0)
    with visipruner.apply(model, everything) as h:
        seq, logits = _generate(model, batch, 3)
        for s in h.batch_stats:
            assert s.critical_tokens == [] and s.visual_tokens_per_layer[-1] == 0
        for r, p in enumerate(prompts):
            a_seq, a_logits = _generate(model, p, 3)
            torch.testing.assert_close(logits[:, r], a_logits[:, 0], atol=1e-4, rtol=0)


def test_right_padding_is_refused_clearly():
    model, prompts = _rows("llava")
    batch = collate(prompts[:2])
    batch["input_ids"] = batch["input_ids"].flip(1)
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with visipruner.apply(model, VisiPrunerConfig()):
        with pytest.raises(ValueError, match="left padding"):
            model(**batch)


def test_bench_and_calibrate_batched_answer_like_batch_one(tmp_path):
    """`bench`'s accuracy runs and `calibrate`'s reruns at --batch-size 3 give the per-question answers
    and statistics of batch size 1 (a tiny LLaVA with a real processor, prompts of different lengths)."""
    import json

    import numpy as np
    from PIL import Image

    from visipruner.bench import _inputs, answer_all
    from visipruner.calibrate import measure
    from visipruner.data.questions import load_questions
    from visipruner.testing import tiny_llava_with_processor

    model, proc = tiny_llava_with_processor(0, layers=6)
    rows = []
    for i, q in enumerate(["what color is the shape ?", "how many ?", "is there a red circle in the image ?",
                           "what shape ?", "yes ?"]):
        img = tmp_path / f"{i}.png"
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype("uint8")).save(img)
        rows.append(json.dumps({"image": str(img), "question": q, "answer": "red", "id": str(i)}))
    (tmp_path / "q.jsonl").write_text("\n".join(rows) + "\n")
    qs = load_questions(str(tmp_path / "q.jsonl"))
    cfg = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=1e-3, exit_threshold=0.0)
    for config in (None, cfg, FastVConfig(layer=2, keep_ratio=0.5), VisionZipConfig()):
        one = answer_all(model, proc, qs, config, 4, "b1", batch_size=1)
        three = answer_all(model, proc, qs, config, 4, "b3", batch_size=3)
        for a, b in zip(one, three):  # the same, but for the padding the batch added
            assert {k: v for k, v in a.items() if k != "padding_flops"} == {
                k: v for k, v in b.items() if k != "padding_flops"}
            assert a.get("padding_flops", 0) == 0
    prompts = [_inputs(proc, q, model) for q in qs]
    ref = measure(model, proc, qs, prompts, None, None, progress=False)["answers"]
    cut = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=1e9)  # all leave at fusion
    m1 = measure(model, proc, qs, prompts, cut, ref, progress=False, batch_size=1)
    m3 = measure(model, proc, qs, prompts, cut, ref, progress=False, batch_size=3)
    assert m1 == m3 and m1["flops_ratio"] < 1


def test_visionzip_rows_are_reduced_as_if_alone():
    """VisionZip shortens each row's prompt before the language model: every row zips its own images,
    the rows come back left-padded to the longest reduced row, and generation (whose attention_mask
    counts the prompt as passed) gives each row's tokens, logits and stats alone."""
    model, prompts = _rows("llava")
    cfg = VisionZipConfig(dominant_ratio=0.25, contextual_ratio=0.125)
    batch = collate(prompts)
    tower = model.model.vision_tower
    together = tower(batch["pixel_values"]).last_hidden_state  # what generate encodes: the batch's images at once
    own = torch.cat([tower(p["pixel_values"]).last_hidden_state for p in prompts if "pixel_values" in p])
    assert torch.equal(together, own)
    steps = 4
    # the second batch is unpadded as passed (a text row as long as the first prompt) and padded once reduced
    n0 = prompts[0]["input_ids"].shape[1]
    same_length = [prompts[0], {"input_ids": torch.arange(n0)[None] % 100 + 4, "attention_mask": torch.ones(1, n0).long()}]
    with visipruner.apply(model, cfg) as h:
        alone = {}
        for p in prompts + same_length[1:]:
            seq, logits = _generate(model, p, steps)
            alone[id(p)] = (seq[0, p["input_ids"].shape[1]:], logits[:, 0], h.last_stats)
        for rows in (prompts, same_length):
            b = collate(rows)
            seq, logits = _generate(model, b, steps)
            n = b["input_ids"].shape[1]
            for r, p in enumerate(rows):
                a_seq, a_logits, a_stats = alone[id(p)]
                assert torch.equal(seq[r, n:], a_seq), r
                torch.testing.assert_close(logits[:, r], a_logits, atol=1e-4, rtol=0, msg=f"row {r}")
                s = h.batch_stats[r].to_dict()  # every figure alone, but for the padding the batch added
                assert a_stats.padding_flops == 0 and s == dict(a_stats.to_dict(), padding_flops=s["padding_flops"]), r
        # without generate: the model's own positions, and a decode step with the caller's mask and no positions
        out = model(**batch, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
        step = model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values).logits[:, -1]
        stats = h.batch_stats
    for r, p in enumerate(prompts):
        a_seq, a_logits, a_stats = alone[id(p)]
        torch.testing.assert_close(out.logits[r, -1], a_logits[0], atol=1e-4, rtol=0)
        assert int(nxt[r]) == int(a_seq[0])
        torch.testing.assert_close(step[r], a_logits[1], atol=1e-4, rtol=0)
    s0 = stats[0]
    assert s0.prompt_length == prompts[0]["input_ids"].shape[1] and s0.num_visual_tokens == 16  # the prompt as passed
    assert s0.visual_tokens_per_layer == [6] * 8 and s0.vision_flops < s0.dense_vision_flops  # 4 dominant + 2 contextual
    assert stats[1].visual_tokens_per_layer == [12] * 8 and not stats[2].pruning_applied
    assert stats[2].padding_flops > 0 and out.logits.shape[1] == batch["input_ids"].shape[1] - 20  # row 1 lost 20


def test_batch_of_one_shares_its_stats():
    model, prompts = _rows("llava")
    with visipruner.apply(model, VisiPrunerConfig(shallow_layers=2)) as h:
        model(**prompts[0])
    assert h.batch_stats == [h.last_stats] and h.last_stats is h.batch_stats[0]


def test_qwen3_vl_batches_are_refused_clearly():
    model, prompts = _rows("qwen3_vl")
    with visipruner.apply(model, VisiPrunerConfig(shallow_layers=2)):
        with pytest.raises(ValueError, match="Qwen3-VL"):
            model(**collate(prompts[:2]))


def test_cached_batched_generation_equals_recomputing_each_row_alone():
    from visipruner import Schedule

    model, prompts = _rows("llava")
    cfg = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=1e-3, exit_threshold=0.0)
    batch = collate(prompts)
    n = batch["input_ids"].shape[1]
    with visipruner.apply(model, cfg) as h:
        seq, logits = _generate(model, batch, 4)
        stats = h.batch_stats
    for r, p in enumerate(prompts):
        s = stats[r]
        sched = Schedule(s.fusion_layer, s.critical_tokens, s.exit_layer) if s.pruning_applied else None
        for t in range(4):
            ids = torch.cat([p["input_ids"], seq[r : r + 1, n : n + t]], dim=1)
            full = dict(p, input_ids=ids, attention_mask=torch.ones_like(ids))
            with visipruner.apply(model, cfg, schedule=sched):
                again = model(**full, use_cache=False).logits[0, -1]
            torch.testing.assert_close(logits[t, r], again, atol=1e-4, rtol=0, msg=f"row {r} step {t}")
