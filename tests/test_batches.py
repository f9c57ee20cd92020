"""Batches: every row of a left-padded batch is pruned exactly as it is alone."""

from __future__ import annotations

import pytest
import torch

import visipruner
from visipruner import FastVConfig, VisiPrunerConfig, VisionZipConfig

from families import FAMILIES, family
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


def _rows(name, second=None):
    fam = family(name)
    model = fam.build(0, "sdpa", 8)
    first, other = fam.batch_layouts or ("one", fam.layouts[1])
    a, _ = fam.prompt(model, 1, first)
    b, _ = fam.prompt(model, 2, second or other)
    c, _ = fam.prompt(model, 3, "one")
    return model, [a, b, text_only(model, c)]  # different lengths; the last row has no visual token


TRIGGERING = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=1e-3, exit_threshold=0.0)
FASTV = FastVConfig(layer=2, keep_ratio=0.5)


def check_rows_as_if_alone(model, prompts, cfg, steps=5):
    """Greedy generation of the left-padded batch of ``prompts`` under ``cfg``: each row's tokens, logits
    (1e-4) and statistics are the prompt's alone; the first row is pruned, the last (text only) padded."""
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
    assert stats[-1].padding_flops > 0 and not stats[-1].pruning_applied  # the short text-only row was padded
    return stats


# every family (Qwen3-VL's deepstack also below); LLaVA-NeXT / OneVision rows have different tile counts and
# Idefics3 / SmolVLM rows different sub-image counts, which collate_prompts pads as their processors do
# (test_padded_images_collate_as_the_model_reads_them); OneVision's and Qwen2-VL's first row holds a video
BATCHED = [f.name for f in FAMILIES]


@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("method", ["visipruner", "fastv"])
def test_each_row_is_pruned_as_if_alone(name, method):
    model, prompts = _rows(name)
    check_rows_as_if_alone(model, prompts, FASTV if method == "fastv" else TRIGGERING)


def back_to_back(model, p: dict) -> dict:
    """The prompt with the text between its first and last visual token left out: its images (tiles,
    frames) back to back, as a processor lays out ``<image><image>``."""
    from visipruner.adapters import get_adapter

    vis = get_adapter(model).visual_mask(p["input_ids"][0])
    at = vis.nonzero().squeeze(-1)
    keep = vis.clone()
    keep[: int(at[0])] = keep[int(at[-1]) + 1 :] = True
    return {k: v[:, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids") else v
            for k, v in p.items()}


@pytest.mark.parametrize("name", BATCHED)
def test_each_rows_spans_are_its_own(name):
    """The spans the runtime works out for each row of a batch (``row_call_kwargs``) are the prompt's
    alone, also where a row's images are back to back (LLaVA-NeXT / OneVision split those by the sizes
    of that row's own images)."""
    from visipruner.adapters import get_adapter

    model, prompts = _rows(name)
    prompts = [prompts[0], back_to_back(model, prompts[1]), prompts[2], prompts[1]]
    adapter, batch = get_adapter(model), collate(prompts)
    ids, N = batch["input_ids"], batch["input_ids"].shape[1]
    for r, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        row = adapter.spans(ids[r, N - n :], adapter.row_call_kwargs(batch, ids, r, N - n))
        assert row == adapter.spans(p["input_ids"][0], p), r
    if name.startswith("llava_"):  # the back-to-back images are one run, two spans by their sizes
        ids = prompts[1]["input_ids"][0]
        assert len(adapter.spans(ids, {})) == 1 < len(adapter.spans(ids, prompts[1]))


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision", "idefics3", "smolvlm"])
def test_padded_images_collate_as_the_model_reads_them(name):
    """Without pruning, the model's own logits on the collated batch are each prompt's alone: the
    padding collate_prompts adds to the tile / sub-image axes is dropped by the model as the
    processor's is."""
    model, prompts = _rows(name)
    batch = collate(prompts)
    assert batch["pixel_values"].shape[1] > min(p["pixel_values"].shape[1] for p in prompts if "pixel_values" in p)
    logits = model(**batch).logits
    for r, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        torch.testing.assert_close(logits[r, -n:], model(**p).logits[0], atol=1e-4, rtol=0, msg=f"row {r}")


# Qwen3-VL's tiny model: fusion at layer 2, a few critical tokens in layers 3 and 4, exit after 4
QWEN3_DEEPSTACK = VisiPrunerConfig(shallow_layers=1, layer_threshold=1.0, tokens_threshold=0.05, exit_threshold=0.0)


@pytest.mark.parametrize("cfg", [QWEN3_DEEPSTACK, FastVConfig(layer=2, keep_ratio=0.5)], ids=["visipruner", "fastv"])
def test_qwen3_vl_rows_get_their_own_deepstack_features(cfg):
    """Qwen3-VL adds deepstack features to the visual tokens after layers 0-4 of the tiny model; both
    methods prune after layer 2 (VisiPruner: fusion at 2, exit after 4), so rows (an image; an image
    and a video; text) that keep different tokens are repacked inside those layers, and every kept
    token must still get its own features."""
    model, prompts = _rows("qwen3_vl", second="video")
    stats = check_rows_as_if_alone(model, prompts, cfg)
    assert stats[1].num_frames == 3
    kept = [s.visual_tokens_per_layer[3] for s in stats[:2]]  # layers 3 and 4 still get deepstack features
    assert 0 < kept[0] < stats[0].num_visual_tokens and 0 < kept[1] < stats[1].num_visual_tokens
    assert stats[0].tokens_per_layer[3] != stats[1].tokens_per_layer[3]  # the rows were repacked


@pytest.mark.parametrize("name", BATCHED)
def test_batch_with_no_row_pruned_and_every_row_pruned_to_nothing(name):
    model, prompts = _rows(name)
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
    ref = measure(model, proc, prompts, None, None, progress=False)["answers"]
    cut = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=1e9)  # all leave at fusion
    m1 = measure(model, proc, prompts, cut, ref, progress=False, batch_size=1)
    m3 = measure(model, proc, prompts, cut, ref, progress=False, batch_size=3)
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


CACHED = [(n, None, TRIGGERING) for n in BATCHED if n != "qwen3_vl"] + [("qwen3_vl", "video", QWEN3_DEEPSTACK)]


@pytest.mark.parametrize("name, second, cfg", CACHED, ids=[c[0] for c in CACHED])
def test_cached_batched_generation_equals_recomputing_each_row_alone(name, second, cfg):
    from visipruner import Schedule

    model, prompts = _rows(name, second)
    batch = collate(prompts)
    n = batch["input_ids"].shape[1]
    with visipruner.apply(model, cfg) as h:
        seq, logits = _generate(model, batch, 4)
        stats = h.batch_stats
    for r, p in enumerate(prompts):
        s = stats[r]
        sched = Schedule(s.fusion_layer, s.critical_tokens, s.exit_layer) if s.pruning_applied else None
        for t in range(4):
            full = family(name).extend(p, seq[r : r + 1, n : n + t])
            with visipruner.apply(model, cfg, schedule=sched):
                again = model(**full, use_cache=False).logits[0, -1]
            torch.testing.assert_close(logits[t, r], again, atol=1e-4, rtol=0, msg=f"row {r} step {t}")


def test_bench_batched_timing_reports_the_padded_cache_it_measured(tmp_path):
    """`bench --batch-size`'s throughput timing: the batch's KV bytes are those of a cache as wide, per
    layer, as that layer's longest row (generated tokens included), the rows' own bytes those of each
    row's kept tokens; the unpruned setting times the unpruned model against itself."""
    import json

    import numpy as np
    from PIL import Image

    from visipruner.bench import _inputs, time_batch
    from visipruner.data.questions import load_questions
    from visipruner.evaluate import kv_bytes_per_token
    from visipruner.testing import tiny_llava_with_processor

    model, proc = tiny_llava_with_processor(0, layers=6)
    rows = []
    for i, q in enumerate(["what color is the shape ?", "how many ?", "is there a red circle in the image ?"]):
        img = tmp_path / f"{i}.png"
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype("uint8")).save(img)
        rows.append(json.dumps({"image": str(img), "question": q, "answer": "red", "id": str(i)}))
    (tmp_path / "q.jsonl").write_text("\n".join(rows) + "\n")
    qs = load_questions(str(tmp_path / "q.jsonl"))
    cfg = VisiPrunerConfig(shallow_layers=2, layer_threshold=1.0, tokens_threshold=1e9)  # all leave at fusion
    steps = 3
    t = time_batch(model, proc, qs, cfg, 3, 1, steps)
    with visipruner.apply(model, cfg) as h:
        model(**collate([_inputs(proc, q, model) for q in qs], proc.tokenizer.pad_token_id or 0))
        stats = h.batch_stats
    per = kv_bytes_per_token(model)
    widths = [max(s.tokens_per_layer[layer] for s in stats) for layer in range(6)]
    assert t["batch_kv_bytes"] == sum(3 * (w + steps - 1) for w in widths) * per
    lengths = [s.prompt_length for s in stats]
    assert t["batch_kv_bytes_unpruned"] == 3 * (max(lengths) + steps - 1) * 6 * per
    own = sum(n + steps - 1 for s in stats for n in s.tokens_per_layer)
    assert t["batch_kv_rows_ratio"] == pytest.approx(own / sum((n + steps - 1) * 6 for n in lengths))
    assert t["batch_kv_ratio"] < 1 and t["batch_size"] == 3
    base = time_batch(model, proc, qs, None, 3, 1, steps)
    assert base["batch_kv_ratio"] == 1.0 and "batch_kv_rows_ratio" not in base
