"""Batches: every row of a left-padded batch is pruned exactly as it is alone."""

from __future__ import annotations

import pytest
import torch

import visipruner
from visipruner import FastVConfig, VisiPrunerConfig

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


def _rows(name):
    fam = family(name)
    model = fam.build(0, "sdpa", 8)
    first, second = fam.batch_layouts or ("one", fam.layouts[1])
    a, _ = fam.prompt(model, 1, first)
    b, _ = fam.prompt(model, 2, second)
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


# every family but Qwen3-VL (refused below); LLaVA-NeXT / OneVision rows have different tile counts and
# Idefics3 / SmolVLM rows different sub-image counts, which collate_prompts pads as their processors do
# (test_padded_images_collate_as_the_model_reads_them); OneVision's and Qwen2-VL's first row holds a video
BATCHED = [f.name for f in FAMILIES if f.name != "qwen3_vl"]


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
    for config in (None, cfg, FastVConfig(layer=2, keep_ratio=0.5)):
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
