"""Deterministic synthetic scenes with region-specific questions.

Each image is a 192x192 canvas divided into a 3x3 grid of 64-pixel cells.
Two to four coloured shapes (shape, colour, size) occupy distinct cells, and
one cell holds a short rendered word.  Question families:

``color``     what colour is the <ref> (a uniquely named object)
``shape_at``  what shape is at the <position>
``count``     how many <colour> shapes are there
``relation``  where is the <A> relative to the <B> (left/right/above/below)
``exist``     is there a <colour> <shape> (yes/no)
``word``      what word is written

Splits: ``train`` (training), ``validation`` (calibration), ``dev`` (scored during
training and used as calibration's held-out set: for development), ``test`` (nothing was
tuned on it: report accuracy here).

Everything is deterministic in ``(seed, split, index)``; within a split the
families cycle and the answers within a family cycle through all values, so
answers are exactly balanced over any multiple of ``len(FAMILIES) * n``.

Command line::

    python -m visipruner.data.scenes --split test --n 600 --out data/scenes
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 192
GRID = 3
CELL = IMAGE_SIZE // GRID

SHAPES = ["circle", "square", "triangle", "diamond"]
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 180),
    "orange": (250, 130, 0),
}
COLOR_NAMES = list(COLORS)
SIZES = ["small", "large"]
WORDS = ["cat", "dog", "sun", "box", "car", "hat", "pen", "cup", "map", "key",
         "bus", "egg"]
POSITIONS = ["top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right"]
RELATIONS = ["left", "right", "above", "below"]
COUNTS = ["0", "1", "2", "3"]
FAMILIES = ["color", "shape_at", "count", "relation", "exist", "word"]
ANSWERS = {
    "color": COLOR_NAMES,
    "shape_at": SHAPES,
    "count": COUNTS,
    "relation": RELATIONS,
    "exist": ["yes", "no"],
    "word": WORDS,
}
# Stream ids of the splits.  ``dev`` is the split that was called ``test`` until the model was
# trained: it was scored during training and steered the recipe, and it holds calibration's
# held-out set, so it is for development only.  ``test`` is a fresh stream nothing was tuned on
# or looked at during training or calibration (tests/test_data.py checks the splits share no
# scene); report accuracy on it.
SPLITS = {"train": 0, "validation": 1, "dev": 2, "test": 3}

# Patch-level label vocabularies used for vision pretraining (0 = background).
TEXT_LABEL = len(SHAPES) + 1  # shape class for the word cell


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major
    dx: int = 0
    dy: int = 0


@dataclass
class Scene:
    objects: list[Obj]
    word: str
    word_cell: int
    background: tuple[int, int, int] = (255, 255, 255)
    word_dx: int = 0
    word_dy: int = 0

    def render(self, background: Image.Image | None = None) -> Image.Image:
        return render_scene(self, background)


@dataclass
class SceneQuestion:
    scene: Scene
    family: str
    question: str
    answer: str
    id: str = ""
    extra: dict = field(default_factory=dict)


_FONT_CACHE: dict[int, ImageFont.ImageFont] = {}


def _font(size: int = 32):
    if size not in _FONT_CACHE:
        try:
            _FONT_CACHE[size] = ImageFont.load_default(size=size)
        except TypeError:  # very old Pillow without sized default font
            _FONT_CACHE[size] = ImageFont.load_default()
    return _FONT_CACHE[size]


def _cell_origin(cell: int) -> tuple[int, int]:
    r, c = divmod(cell, GRID)
    return c * CELL, r * CELL


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    x0, y0 = _cell_origin(o.cell)
    cx, cy = x0 + CELL // 2 + o.dx, y0 + CELL // 2 + o.dy
    r = 25 if o.size == "large" else 13
    col = COLORS[o.color]
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif o.shape == "square":
        s = int(r * 0.88)
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=col)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + int(r * 0.85)),
                      (cx + r, cy + int(r * 0.85))], fill=col)
    elif o.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)],
                     fill=col)
    else:  # pragma: no cover
        raise ValueError(o.shape)


def render_scene(scene: Scene, background: Image.Image | None = None) -> Image.Image:
    """The scene's shapes and word drawn on its flat background colour, or on ``background`` (an
    ``IMAGE_SIZE`` square RGB image, e.g. a photo crop: ``visipruner.data.photos``) when given."""
    if background is None:
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    elif background.size != (IMAGE_SIZE, IMAGE_SIZE) or background.mode != "RGB":
        raise ValueError(f"background must be an RGB {IMAGE_SIZE}x{IMAGE_SIZE} image; got {background.mode} {background.size}")
    else:
        img = background.copy()
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_shape(draw, o)
    x0, y0 = _cell_origin(scene.word_cell)
    draw.text((x0 + CELL // 2 + scene.word_dx, y0 + CELL // 2 + scene.word_dy),
              scene.word, fill=(0, 0, 0), font=_font(), anchor="mm")
    return img


def patch_labels(scene: Scene, patch: int = 16) -> dict[str, np.ndarray]:
    """Per-patch targets for vision pretraining (row-major, (G*G,) int arrays).

    ``color``: 0 background, 1+index into COLOR_NAMES;  ``shape``: 0 background,
    1+index into SHAPES, TEXT_LABEL for the word cell; ``size``: 0 bg, 1 small,
    2 large; ``word``: 0 or 1+index into WORDS (whole word cell);
    ``cell``: 0..8 grid cell of the patch.
    """
    g = IMAGE_SIZE // patch
    out = {k: np.zeros((g, g), dtype=np.int64) for k in ("color", "shape", "size", "word")}
    per_cell = CELL // patch
    for o in scene.objects:
        x0, y0 = _cell_origin(o.cell)
        cx, cy = x0 + CELL // 2 + o.dx, y0 + CELL // 2 + o.dy
        r = 25 if o.size == "large" else 13
        # patches whose centre lies within the object's bounding box (+slack)
        for py in range(g):
            for px in range(g):
                pcx, pcy = px * patch + patch / 2, py * patch + patch / 2
                if abs(pcx - cx) <= r + 4 and abs(pcy - cy) <= r + 4:
                    out["color"][py, px] = 1 + COLOR_NAMES.index(o.color)
                    out["shape"][py, px] = 1 + SHAPES.index(o.shape)
                    out["size"][py, px] = 1 + SIZES.index(o.size)
    r0, c0 = divmod(scene.word_cell, GRID)
    out["shape"][r0 * per_cell:(r0 + 1) * per_cell, c0 * per_cell:(c0 + 1) * per_cell] = TEXT_LABEL
    out["word"][r0 * per_cell:(r0 + 1) * per_cell, c0 * per_cell:(c0 + 1) * per_cell] = 1 + WORDS.index(scene.word)
    cell = np.zeros((g, g), dtype=np.int64)
    for py in range(g):
        for px in range(g):
            cell[py, px] = (py // per_cell) * GRID + px // per_cell
    out["cell"] = cell
    return {k: v.reshape(-1) for k, v in out.items()}


# --------------------------------------------------------------------------
# Scene sampling


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return np.random.default_rng([int(seed), SPLITS[split], int(index), 7919])


def _random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    if n_objects is None:
        n_objects = int(rng.integers(2, 5))
    cells = rng.permutation(GRID * GRID)
    objs = []
    for k in range(n_objects):
        objs.append(Obj(
            shape=SHAPES[rng.integers(len(SHAPES))],
            color=COLOR_NAMES[rng.integers(len(COLOR_NAMES))],
            size=SIZES[rng.integers(2)],
            cell=int(cells[k]),
            dx=int(rng.integers(-4, 5)),
            dy=int(rng.integers(-4, 5)),
        ))
    bg = tuple(int(v) for v in rng.integers(235, 256, size=3))
    return Scene(objects=objs, word=WORDS[rng.integers(len(WORDS))],
                 word_cell=int(cells[n_objects]), background=bg,
                 word_dx=int(rng.integers(-3, 4)), word_dy=int(rng.integers(-5, 6)))


def _ref(scene: Scene, obj: Obj) -> str | None:
    """Shortest unique referring expression for ``obj`` (or None)."""
    others = [o for o in scene.objects if o is not obj]
    if all(o.shape != obj.shape for o in others):
        return obj.shape
    if all((o.shape, o.size) != (obj.shape, obj.size) for o in others):
        return f"{obj.size} {obj.shape}"
    return None


def _ref_cs(scene: Scene, obj: Obj) -> str | None:
    """Referring expression that includes colour (used by ``relation``)."""
    others = [o for o in scene.objects if o is not obj]
    if all((o.color, o.shape) != (obj.color, obj.shape) for o in others):
        return f"{obj.color} {obj.shape}"
    return None


def _make_color(rng, answer):
    for _ in range(100):
        s = _random_scene(rng)
        t = s.objects[0]
        t.color = answer
        ref = _ref(s, t)
        if ref is not None:
            return s, f"What color is the {ref}?"
    raise RuntimeError("could not build colour question")


def _make_shape_at(rng, answer):
    s = _random_scene(rng)
    t = s.objects[0]
    t.shape = answer
    return s, f"What shape is at the {POSITIONS[t.cell]}?"


def _make_count(rng, answer):
    k = int(answer)
    color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    n = int(rng.integers(max(2, k), 5))
    s = _random_scene(rng, n)
    others = [c for c in COLOR_NAMES if c != color]
    for i, o in enumerate(s.objects):
        o.color = color if i < k else others[rng.integers(len(others))]
    return s, f"How many {color} shapes are there?"


def _make_relation(rng, answer):
    for _ in range(200):
        s = _random_scene(rng, int(rng.integers(2, 5)))
        a, b = s.objects[0], s.objects[1]
        ra, ca = divmod(a.cell, GRID)
        rb, cb = divmod(b.cell, GRID)
        # Re-place a relative to b so the relation is unambiguous (same row or column).
        if answer in ("left", "right"):
            if (answer == "left" and cb == 0) or (answer == "right" and cb == GRID - 1):
                continue
            cols = range(0, cb) if answer == "left" else range(cb + 1, GRID)
            target = rb * GRID + int(rng.choice(list(cols)))
        else:
            if (answer == "above" and rb == 0) or (answer == "below" and rb == GRID - 1):
                continue
            rows = range(0, rb) if answer == "above" else range(rb + 1, GRID)
            target = int(rng.choice(list(rows))) * GRID + cb
        occupied = {o.cell: o for o in s.objects}
        if target == s.word_cell:
            s.word_cell = a.cell
        elif target in occupied and occupied[target] is not a:
            occupied[target].cell = a.cell
        a.cell = target
        ra_, rb_ = _ref_cs(s, a), _ref_cs(s, b)
        if ra_ and rb_:
            return s, f"Where is the {ra_} relative to the {rb_}?"
    raise RuntimeError("could not build relation question")


def _make_exist(rng, answer):
    s = _random_scene(rng)
    if answer == "yes":
        t = s.objects[int(rng.integers(len(s.objects)))]
        return s, f"Is there a {t.color} {t.shape}?"
    present = {(o.color, o.shape) for o in s.objects}
    # hard negatives: colour and shape each present, but not together, when possible
    cands = [(c, sh) for c in {o.color for o in s.objects} for sh in {o.shape for o in s.objects}
             if (c, sh) not in present]
    if not cands or rng.random() < 0.4:
        cands = [(c, sh) for c in COLOR_NAMES for sh in SHAPES if (c, sh) not in present]
    cands.sort()
    c, sh = cands[int(rng.integers(len(cands)))]
    return s, f"Is there a {c} {sh}?"


def _make_word(rng, answer):
    s = _random_scene(rng)
    s.word = answer
    return s, "What word is written?"


_MAKERS = {
    "color": _make_color,
    "shape_at": _make_shape_at,
    "count": _make_count,
    "relation": _make_relation,
    "exist": _make_exist,
    "word": _make_word,
}


def make_question(seed: int, split: str, index: int,
                  families: list[str] | None = None) -> SceneQuestion:
    """The ``index``-th question of ``split`` for ``seed`` (deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    fams = families or FAMILIES
    fam = fams[index % len(fams)]
    answers = ANSWERS[fam]
    j = index // len(fams)
    # cycle through a seed-dependent permutation of the answers (exact balance)
    perm = np.random.default_rng([int(seed), SPLITS[split], j // len(answers), 31]).permutation(len(answers))
    answer = answers[int(perm[j % len(answers)])]
    rng = _rng(seed, split, index)
    scene, q = _MAKERS[fam](rng, answer)
    return SceneQuestion(scene=scene, family=fam, question=q, answer=answer,
                         id=f"scene-{split}-{seed}-{index}")


def make_questions(seed: int, split: str, n: int, start: int = 0,
                   families: list[str] | None = None) -> list[SceneQuestion]:
    return [make_question(seed, split, i, families) for i in range(start, start + n)]


def write_split(out_dir: str, split: str = "test", n: int = 600, seed: int = 0,
                start: int = 0, families: list[str] | None = None) -> str:
    """Write ``n`` questions of ``split`` as ``<out_dir>/<split>.jsonl`` + PNGs.

    Returns the JSONL path.  Image paths in the JSONL are relative to its folder.
    """
    img_dir = os.path.join(out_dir, f"{split}_images")
    os.makedirs(img_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{split}.jsonl")
    with open(path, "w") as f:
        for sq in make_questions(seed, split, n, start, families):
            name = f"{sq.id}.png"
            sq.scene.render().save(os.path.join(img_dir, name))
            f.write(json.dumps({"image": f"{split}_images/{name}", "question": sq.question,
                                "answer": sq.answer, "family": sq.family, "id": sq.id}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a split of generated scene questions as JSONL + PNGs.")
    p.add_argument("--split", default="test", choices=list(SPLITS))
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--out", default="data/scenes")
    a = p.parse_args(argv)
    print(write_split(a.out, a.split, a.n, a.seed, a.start))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def relation_questions(scene: Scene) -> list[tuple[str, str]]:
    """Every ``(question, answer)`` relation question the scene supports: each ordered pair of
    objects in the same row (left/right) or column (above/below) that can both be named by
    colour and shape. Ordered pairs come in both directions, so the answers are balanced within a
    scene (left with right, above with below)."""
    out = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            ra, ca = divmod(a.cell, GRID)
            rb, cb = divmod(b.cell, GRID)
            rel = None
            if ra == rb:
                rel = "left" if ca < cb else "right"
            elif ca == cb:
                rel = "above" if ra < rb else "below"
            if rel:
                pa, pb = _ref_cs(scene, a), _ref_cs(scene, b)
                if pa and pb:
                    out.append((f"Where is the {pa} relative to the {pb}?", rel))
    return out


def scene_questions(scene: Scene, rng: np.random.Generator, per_family: int = 2) -> list[tuple[str, str, str]]:
    """Up to ``per_family`` ``(family, question, answer)`` triples per family about one scene.

    Used to pack many questions per image during training; answers are not
    exactly balanced (unlike :func:`make_question`).
    """
    out = []
    objs = list(scene.objects)
    order = [objs[i] for i in rng.permutation(len(objs))]
    n = 0
    for o in order:
        ref = _ref(scene, o)
        if ref is not None and n < per_family:
            out.append(("color", f"What color is the {ref}?", o.color))
            n += 1
    for o in order[:per_family]:
        out.append(("shape_at", f"What shape is at the {POSITIONS[o.cell]}?", o.shape))
    colors = []
    for _ in range(per_family):
        # aim for a uniformly drawn count; fall back to any colour
        k = int(rng.integers(4))
        with_k = [c for c in COLOR_NAMES if sum(x.color == c for x in objs) == k]
        pool = with_k or COLOR_NAMES
        colors.append(pool[int(rng.integers(len(pool)))])
    for color in dict.fromkeys(colors):
        k = sum(x.color == color for x in objs)
        if k <= 3:
            out.append(("count", f"How many {color} shapes are there?", str(k)))
    pairs = relation_questions(scene)
    for i in rng.permutation(len(pairs))[:per_family]:
        out.append(("relation", *pairs[int(i)]))
    present_cs = {(x.color, x.shape) for x in objs}
    t = objs[int(rng.integers(len(objs)))]
    yes = ("exist", f"Is there a {t.color} {t.shape}?", "yes")
    cands = sorted((c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present_cs)
    hard = sorted((c, s) for c in {x.color for x in objs} for s in {x.shape for x in objs}
                  if (c, s) not in present_cs)
    pool = hard if hard and rng.random() < 0.6 else cands
    c, s = pool[int(rng.integers(len(pool)))]
    no = ("exist", f"Is there a {c} {s}?", "no")
    out.extend([yes, no][: max(1, per_family)] if rng.random() < 0.5 else [no, yes][: max(1, per_family)])
    out.append(("word", "What word is written?", scene.word))
    return out


def random_scene(seed: int, split: str, index: int) -> Scene:
    """A random (unconditioned) scene, deterministic in ``(seed, split, index)``."""
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index), 104729])
    return _random_scene(rng)
