"""`visipruner eval`: exact-match VQA accuracy of a model, unpruned or with a pruning method.

    visipruner eval --data FILE.jsonl [--model DIR] [--config METHOD.json] [--json OUT] [--batch-size B]

Batched greedy decoding with left padding (with ``--config``, every row of a batch is pruned as
if alone, so the answers are those of batch size 1); answers are compared after normalisation
(lowercase, punctuation and surrounding/duplicate whitespace removed). The core is
:func:`evaluate`, reusable from Python.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
import time
from collections import defaultdict

import torch

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(s: str) -> str:
    s = _PUNCT.sub(" ", s.lower())
    return " ".join(s.split())


def build_prompt(processor, question: str, num_images: int = 1) -> str:
    """The chat-template prompt: the images first, then the question, then the assistant turn."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    msgs = [{"role": "user", "content": content}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


def prepare_batch(processor, questions, images=None):
    """Processor inputs (left padded) for a list of Question objects."""
    if images is None:
        images = [q.load_image() for q in questions]
    prompts = [build_prompt(processor, q.question) for q in questions]
    tok = processor.tokenizer
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        return processor(images=images, text=prompts, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = old


def to_model(model, inputs) -> dict:
    """Processor outputs on the model's device, the pixels in its dtype."""
    p = next(model.parameters())
    return {k: (v.to(p.device, p.dtype) if k == "pixel_values" else v.to(p.device)) for k, v in inputs.items()}


@torch.no_grad()
def generate_answers(model, processor, questions, max_new_tokens: int = 6, images=None, **generate_kwargs) -> list[str]:
    """Greedy answers to a batch of questions (``images``: one PIL image per question, default: loaded)."""
    inputs = to_model(model, prepare_batch(processor, questions, images))
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if isinstance(eos, int) and eos >= 0 and eos != tok.unk_token_id:
        kw["eos_token_id"] = eos
    kw.update(generate_kwargs)
    return generate_rows(model, processor, inputs, kw)


def summarize(records: list[dict]) -> dict:
    fam = defaultdict(lambda: [0, 0])
    for r in records:
        fam[r["family"]][0] += int(r["correct"])
        fam[r["family"]][1] += 1
    n = len(records)
    c = sum(int(r["correct"]) for r in records)
    return {
        "overall": {"accuracy": c / n if n else 0.0, "correct": c, "n": n},
        "families": {k: {"accuracy": v[0] / v[1], "correct": v[0], "n": v[1]} for k, v in sorted(fam.items())},
    }


def evaluate(model, processor, questions, batch_size: int = 8, max_new_tokens: int = 6,
             progress: bool = True, generate_fn=None, **generate_kwargs) -> dict:
    """Accuracy per family and overall. ``questions``: list of :class:`Question`.

    ``generate_fn(model, processor, batch) -> list[str]`` can replace the default
    batched greedy decoding (e.g. for a pruned model).
    Returns ``{"overall": {...}, "families": {...}, "predictions": [...], "seconds": float}``.
    """
    from tqdm.auto import tqdm

    model.eval()
    records = []
    t0 = time.time()
    bar = tqdm(total=len(questions), desc="eval", disable=not progress, file=sys.stderr)
    for i in range(0, len(questions), batch_size):
        batch = questions[i:i + batch_size]
        if generate_fn is not None:
            preds = generate_fn(model, processor, batch)
        else:
            preds = generate_answers(model, processor, batch, max_new_tokens=max_new_tokens, **generate_kwargs)
        for q, p in zip(batch, preds):
            records.append({"id": q.id, "family": q.family, "question": q.question, "answer": q.answer,
                            "prediction": p, "correct": normalize_answer(p) == normalize_answer(q.answer)})
        bar.update(len(batch))
        acc = sum(r["correct"] for r in records) / len(records)
        bar.set_postfix(acc=f"{acc:.3f}")
    bar.close()
    res = summarize(records)
    res["predictions"] = records
    res["seconds"] = time.time() - t0
    return res


def _run(args) -> int:
    from . import inputs

    for flag, value in (("--limit", args.limit), ("--sample", args.sample), ("--batch-size", args.batch_size),
                        ("--threads", args.threads)):
        inputs.at_least(flag, value, 1)
    inputs.model_dir("--model", args.model)
    inputs.weights_dir("--weights", args.weights)
    inputs.output_file("--json", args.json)
    cfg = inputs.method_config("--config", args.config) if args.config else None
    questions = inputs.read_questions(args.data)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sample and args.sample < len(questions):
        import random

        rnd = random.Random(args.seed)
        questions = rnd.sample(questions, args.sample)
    if args.limit:
        questions = questions[:args.limit]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.model:
        from .models.organism import load_model_dir

        model, processor = load_model_dir(args.model, device=args.device, dtype=dtype)
    else:
        from .models import load_organism

        model, processor = load_organism(device=args.device, dtype=dtype, weights_dir=args.weights)
    handle, stats = None, []
    if cfg is not None:
        from . import apply

        handle = apply(model, cfg)

    def pruned_answers(model, processor, batch):
        preds = generate_answers(model, processor, batch)
        stats.extend(handle.batch_stats)
        return preds

    try:
        res = evaluate(model, processor, questions, batch_size=args.batch_size, progress=not args.no_progress,
                       generate_fn=pruned_answers if handle is not None else None)
    finally:
        if handle is not None:
            handle.remove()
    res["data"] = args.data
    res["model"] = args.model or "organism"
    res["method"] = cfg.to_dict() if cfg is not None else None
    if cfg is not None:
        for rec, s in zip(res["predictions"], stats):
            rec.update(pruning_applied=s.pruning_applied, avg_visual_tokens=s.avg_visual_tokens,
                       prefill_flops_ratio=s.prefill_flops_ratio, fusion_layer=s.fusion_layer,
                       exit_layer=s.exit_layer, padding_flops=s.padding_flops)
        res["mean_prefill_flops_ratio"] = sum(s.prefill_flops_ratio for s in stats) / max(1, len(stats))
    o = res["overall"]
    print(f"overall: {o['accuracy']:.4f} ({o['correct']}/{o['n']})"
          + (f"; {cfg.method}: prefill FLOPs {res['mean_prefill_flops_ratio']:.3f} of unpruned" if cfg is not None
             else ""))
    for k, v in res["families"].items():
        print(f"  {k:<10} {v['accuracy']:.4f} ({v['correct']}/{v['n']})")
    print(f"{res['seconds']:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="VQA exact-match accuracy of a model (unpruned or pruned) on a question file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="question file (JSONL)")
    p.add_argument("--model", default=None, help="saved HF Llava dir (default: the built-in organism)")
    p.add_argument("--weights", default=None,
                   help="organism weights dir (organism.safetensors + organism.json); default: the shipped ones")
    p.add_argument("--json", default=None, help="write results (incl. predictions) here")
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--sample", type=int, default=None, help="random subset of N questions (see --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None,
                   help="a pruning method's config (JSON file or text, e.g. a VisiPruner config from `calibrate`); "
                        "default: the unpruned model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)
    return p


# inputs a processor gives per prompt: token-aligned ones are left-padded, per-image ones concatenated
_TOKEN_ALIGNED = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
_PER_IMAGE = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "image_sizes",
              "batch_num_images", "pixel_attention_mask")
# images (tiles, sub-images) the processors zero-pad to a common shape; Idefics3 / SmolVLM hold one row
# per prompt (its sub-images) in them, not one per image
_PADDED_IMAGES = ("pixel_values", "pixel_attention_mask")


def _zero_pad(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """``parts`` zero-padded at the end of every axis but the first to the largest size among them: the
    processors pad LLaVA-NeXT's tile axis and Idefics3's sub-image and pixel axes so (all-zero tiles and
    sub-images, mask 0), and their models drop that padding again (by ``image_sizes``; by all-zero images)."""
    dims = max(t.dim() for t in parts)
    if any(t.dim() != dims for t in parts):
        raise ValueError(f"collate_prompts: per-image inputs of different ranks {sorted({t.dim() for t in parts})}")
    size = [max(int(t.shape[i]) for t in parts) for i in range(1, dims)]
    out = []
    for t in parts:
        pad = [x for i in reversed(range(1, dims)) for x in (0, size[i - 1] - int(t.shape[i]))]
        out.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return out


def collate_prompts(prompts: list[dict], pad_token_id: int | None = 0) -> dict:
    """One left-padded batch from single-prompt inputs (each ``input_ids`` of shape (1, n)), laid out as
    a processor with ``padding_side='left'`` lays it out; each row's tokens are its prompt's tokens.
    Per-image inputs are concatenated in prompt order, images zero-padded to a common shape as the
    processors pad them (see ``_zero_pad``); where images come one row per prompt (``pixel_attention_mask``:
    Idefics3, SmolVLM) a prompt without images gets a row of padding. One prompt is returned as it is;
    ``pad_token_id`` None pads with 0."""
    if len(prompts) == 1:
        return dict(prompts[0])
    pad_token_id = pad_token_id or 0
    n = max(int(p["input_ids"].shape[1]) for p in prompts)
    out = {}
    for key in _TOKEN_ALIGNED:
        if not any(key in p for p in prompts):
            continue
        rows = []
        for p in prompts:
            ids = p["input_ids"]
            t = p.get(key, torch.ones_like(ids) if key == "attention_mask" else torch.zeros_like(ids))
            fill = pad_token_id if key == "input_ids" else 0
            rows.append(torch.cat([torch.full((1, n - t.shape[1]), fill, dtype=t.dtype), t], dim=1))
        out[key] = torch.cat(rows)
    per_prompt = any("pixel_attention_mask" in p for p in prompts)
    for key in _PER_IMAGE:
        parts = [p[key] for p in prompts if key in p]
        if not parts:
            continue
        if key in _PADDED_IMAGES:
            if per_prompt:
                empty = parts[0].new_zeros((1, 0) + tuple(parts[0].shape[2:]))
                parts = [p.get(key, empty) for p in prompts]
            parts = _zero_pad(parts)
        out[key] = torch.cat(parts)
    unknown = sorted({k for p in prompts for k in p} - set(_TOKEN_ALIGNED) - set(_PER_IMAGE))
    if unknown:
        raise ValueError(f"collate_prompts does not know how to batch {unknown}")
    return out


def generate_rows(model, processor, inputs: dict, gen_kwargs: dict) -> list[str]:
    """Greedy answers of a (possibly batched, left-padded) prompt batch, decoded per row."""
    gen = model.generate(**inputs, **gen_kwargs)
    new = gen[:, inputs["input_ids"].shape[1]:]
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def answer_batches(model, processor, prompts, config, gen_kwargs: dict, batch_size: int = 1, desc: str = "answers",
                   progress: bool = True, total: int | None = None):
    """Greedy answers to single-prompt inputs (an iterable, consumed ``batch_size`` at a time, so a
    generator builds each chunk's prompts only when needed; ``total``: its length for the progress
    bar), one left-padded ``generate`` call per chunk, with ``config`` applied (None: unpruned; each
    row pruned as if alone). Yields per chunk ``(prompts, answers, stats)``; ``stats``: the handle's
    ``batch_stats`` (None per row when unpruned)."""
    from itertools import islice

    from tqdm.auto import tqdm

    from . import apply

    it = iter(prompts)
    handle = apply(model, config) if config is not None else None
    try:
        bar = tqdm(total=total if total is not None else len(prompts), desc=desc, disable=not progress,
                   file=sys.stderr, leave=False)
        while chunk := list(islice(it, batch_size)):
            answers = generate_rows(model, processor, collate_prompts(chunk, processor.tokenizer.pad_token_id),
                                    gen_kwargs)
            yield chunk, answers, handle.batch_stats if handle is not None else [None] * len(chunk)
            bar.update(len(chunk))
        bar.close()
    finally:
        if handle is not None:
            handle.remove()


def kv_cache_bytes(cache) -> int:
    """Bytes a KV cache's tensors hold (keys and values of every layer, padding included)."""
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def kv_bytes_per_token(model) -> int:
    """KV-cache bytes one token takes in one layer (keys and values)."""
    from .flops import Dims

    return 2 * Dims.from_config(model.config.get_text_config()).kv_dim * next(model.parameters()).element_size()


def rows_kv_bytes(model, batch_stats, generated: int, pruned: bool = True) -> int:
    """KV bytes a batch's rows' own tokens need after ``generated`` decode steps (what a per-row,
    ragged or paged, cache holds): per row and layer, the prompt tokens that layer kept plus the
    generated ones. ``pruned=False``: every row's whole prompt in every layer (the unpruned cache)."""
    L = model.config.get_text_config().num_hidden_layers
    total = 0
    for s in batch_stats:
        kept = s.tokens_per_layer if pruned and s.pruning_applied else [s.prompt_length] * L
        total += sum(n + generated for n in kept)
    return total * kv_bytes_per_token(model)


@torch.no_grad()
def time_generation(model, inputs: dict, new_tokens: int) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds per step, KV-cache bytes after the last step) of greedy
    decoding ``new_tokens`` tokens from a batch of keyword inputs: one prefill, then single-token
    steps against the cache (no end-of-sequence stop, so every run does the same steps)."""
    sync = torch.cuda.synchronize if inputs["input_ids"].is_cuda else (lambda: None)
    mask = inputs.get("attention_mask")
    sync()
    t0 = time.perf_counter()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    sync()
    t1 = time.perf_counter()
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    # 1-D rotary positions as generate() passes them (a cache pruned before layer 0 cannot count them);
    # M-RoPE models (rope_deltas) continue their 3-D positions themselves from the mask
    one_d = not hasattr(getattr(model, "model", model), "rope_deltas")
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        extra = {"position_ids": mask.long().cumsum(-1)[:, -1:] - 1} if one_d else {}
        out = model(input_ids=tok, past_key_values=cache, use_cache=True, attention_mask=mask, **extra)
        tok = out.logits[:, -1:].argmax(-1)
    sync()
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(1, new_tokens - 1), kv_cache_bytes(cache)
