"""easy-vqa (https://pypi.org/project/easy-vqa/) converted to the question-file format.

The ``easy-vqa`` package ships its images and questions; we reference the
images by absolute path inside site-packages (nothing is copied).

    python -m visipruner.data.easyvqa --split test --out data/easyvqa
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

SHAPES = ["circle", "rectangle", "triangle"]
COLORS = ["red", "green", "blue", "yellow", "gray", "teal", "black", "brown"]


def data_dir() -> Path:
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or spec.origin is None:
        raise RuntimeError("the `easy-vqa` package is not installed (pip install --no-deps easy-vqa)")
    return Path(spec.origin).parent / "data"


def family_of(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yesno"
    if answer in SHAPES:
        return "shape"
    return "color"


def records(split: str = "test") -> list[dict]:
    """easy-vqa questions of ``split`` ('train' or 'test') as question-file records."""
    if split not in ("train", "test"):
        raise ValueError(f"easy-vqa has splits 'train' and 'test', not {split!r}")
    d = data_dir() / split
    qs = json.loads((d / "questions.json").read_text())
    out = []
    for i, (q, a, img) in enumerate(qs):
        out.append({"image": str((d / "images" / f"{img}.png").resolve()), "question": q[:1].upper() + q[1:],
                    "answer": a, "family": family_of(a), "id": f"easyvqa-{split}-{i}", "image_id": int(img)})
    return out


def image_labels(split: str = "train") -> dict[int, dict]:
    """Image-level labels {image_id: {"color": str|None, "shape": str|None, "path": str}}."""
    labels: dict[int, dict] = {}
    for r in records(split):
        lab = labels.setdefault(r["image_id"], {"color": None, "shape": None, "path": r["image"]})
        a, q = r["answer"], r["question"].lower()
        if a in SHAPES:
            lab["shape"] = a
        elif a in COLORS:
            lab["color"] = a
        elif a == "yes":
            for c in COLORS:
                if f" {c} shape" in q and " not " not in q:
                    lab["color"] = lab["color"] or c
            for s in SHAPES:
                if f" {s}" in q and " not " not in q:
                    lab["shape"] = lab["shape"] or s
    return labels


def write_jsonl(out_dir: str, split: str = "test", limit: int | None = None) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"easyvqa_{split}.jsonl")
    recs = records(split)
    if limit:
        recs = recs[:limit]
    with open(path, "w") as f:
        for r in recs:
            r = {k: v for k, v in r.items() if k != "image_id"}
            f.write(json.dumps(r) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Convert easy-vqa to JSONL question files.")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--out", default="data/easyvqa")
    p.add_argument("--limit", type=int, default=None)
    a = p.parse_args(argv)
    print(write_jsonl(a.out, a.split, a.limit))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
