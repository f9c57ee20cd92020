"""Question files: JSONL, one object per line.

Required keys: ``image`` (path relative to the JSONL file's folder, or
absolute), ``question``, ``answer`` (strings).  Optional: ``family``, ``id``.
Blank lines are skipped.  Anything else is rejected with an ``InputError`` (a ``ValueError``)
naming the file, the line number and what is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..inputs import InputError

REQUIRED = ("image", "question", "answer")
OPTIONAL = ("family", "id")


@dataclass(frozen=True)
class Question:
    image: str  # absolute (resolved) path
    question: str
    answer: str
    family: str = "all"
    id: str = ""

    def load_image(self):
        from PIL import Image

        return Image.open(self.image).convert("RGB")


def _err(path, lineno, msg):
    return InputError(f"{path}:{lineno}: {msg}")


def load_questions(path: str | os.PathLike, check_images: bool = True, verify_images: bool = False) -> list[Question]:
    """Read a question file. Raises ``InputError`` (a ``ValueError``) on malformed lines.

    ``check_images``: each image file must exist. ``verify_images``: each must also open as an
    image (checked after the whole file parses, so syntax errors are reported first).
    """
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    out: list[Question] = []
    lines: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _err(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise _err(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in REQUIRED if k not in obj]
            if missing:
                raise _err(path, lineno, f"missing required key(s) {', '.join(map(repr, missing))}")
            for k in REQUIRED:
                if not isinstance(obj[k], str):
                    raise _err(path, lineno, f"key {k!r} must be a string, got {type(obj[k]).__name__}")
                if not obj[k].strip():
                    raise _err(path, lineno, f"key {k!r} is empty")
            for k in OPTIONAL:
                if k in obj and not isinstance(obj[k], (str, int)):
                    raise _err(path, lineno, f"key {k!r} must be a string, got {type(obj[k]).__name__}")
            img = obj["image"]
            img_path = img if os.path.isabs(img) else os.path.join(base, img)
            if check_images and not os.path.isfile(img_path):
                raise _err(path, lineno, f"image file not found: {img_path}")
            out.append(Question(
                image=os.path.normpath(img_path), question=obj["question"], answer=obj["answer"],
                family=str(obj.get("family") or "all"), id=str(obj.get("id", f"{os.path.basename(path)}:{lineno}")),
            ))
            lines.append(lineno)
    if verify_images:
        _verify_images(path, out, lines)
    return out


def _verify_images(path: str, questions: list[Question], lines: list[int]) -> None:
    """Every image opens and decodes (PIL's verify: headers and checksums, no full decode)."""
    from PIL import Image

    seen: set[str] = set()
    for q, lineno in zip(questions, lines):
        if q.image in seen:
            continue
        try:
            with Image.open(q.image) as im:
                im.verify()
        except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, SyntaxError, struct.error)
            raise _err(path, lineno, f"key 'image': {q.image} cannot be read as an image ({type(e).__name__}: {e})") from None
        seen.add(q.image)


def write_questions(path: str | os.PathLike, questions, relative_to_file: bool = True) -> None:
    """Write Question objects (or dicts) as JSONL; image paths made relative when possible."""
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "w", encoding="utf-8") as f:
        for q in questions:
            d = q if isinstance(q, dict) else {"image": q.image, "question": q.question, "answer": q.answer,
                                                "family": q.family, "id": q.id}
            d = dict(d)
            if relative_to_file and os.path.isabs(d["image"]):
                rel = os.path.relpath(d["image"], base)
                if not rel.startswith(".."):
                    d["image"] = rel
            f.write(json.dumps(d) + "\n")
