"""The `visipruner_scenes` lmms-eval task: the embedded model's scene questions, offline.

The questions are the scenes module's ``test`` split (``visipruner.data.scenes``), written on first
use as JSONL + PNGs under ``~/.cache/visipruner/data/`` by its public ``write_split``. The folder's
name carries a fingerprint of the split's first questions, so if the split's definition changes
the task regenerates instead of reading stale files. Scoring is exact match after the
normalisation ``visipruner eval`` uses, so the two report the same accuracy on the same questions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from lmms_eval.api.task import ConfigurableTask

from ..evaluate import normalize_answer

SPLIT = "test"
DEFAULT_QUESTIONS = 600


def _fingerprint(n: int, seed: int) -> str:
    from ..data import scenes

    head = [(q.id, q.question, q.answer) for q in scenes.make_questions(seed, SPLIT, min(n, 6))]
    return hashlib.sha1(json.dumps([n, seed, head]).encode()).hexdigest()[:10]


def ensure_data(n: int = DEFAULT_QUESTIONS, seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The task's question file (absolute image paths), generated on first use; returns its path.

    Written in a temporary folder and renamed into place, so processes started together (one per
    rank) never read a half-written split.
    """
    from ..data import scenes
    from ..data.questions import load_questions, write_questions

    if root is None:
        from ..models.organism import cache_dir

        root = cache_dir() / "data"
    final = Path(root) / f"lmms_scenes_{SPLIT}_{n}_{_fingerprint(n, seed)}"
    path = final / "questions.jsonl"
    if path.exists():
        return path
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        split_file = scenes.write_split(str(tmp), SPLIT, n=n, seed=seed)
        qs = load_questions(split_file)
        # image paths as they will be after the rename; lmms-eval's json loader keeps strings as-is
        qs = [dataclasses.replace(q, image=str(final / Path(q.image).relative_to(tmp))) for q in qs]
        write_questions(tmp / "questions.jsonl", qs, relative_to_file=False)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not path.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


class ScenesTask(ConfigurableTask):
    """A ConfigurableTask whose data file is generated before lmms-eval loads it."""

    def __init__(self, config: dict):
        config = {k: v for k, v in config.items() if k != "class"}
        n = int((config.get("metadata") or {}).get("num_questions", DEFAULT_QUESTIONS))
        config["dataset_kwargs"] = {"data_files": {SPLIT: str(ensure_data(n))}}
        super().__init__(config=config)


def doc_to_visual(doc):
    from PIL import Image

    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    """Exact match; with the visipruner plugin also the prompt's prefill FLOPs ratio and visual tokens per layer."""
    pred = results[0] if results else ""
    out = {"exact_match": float(normalize_answer(pred) == normalize_answer(doc["answer"]))}
    from .model import sample_stats

    s = sample_stats(doc)
    if s is not None:
        out["prefill_flops_ratio"] = s["prefill_flops_ratio"]
        out["visual_tokens_per_layer"] = s["avg_visual_tokens"]
    return out
