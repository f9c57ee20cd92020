"""Real photographs with the scene questions: a source the embedded model was never trained on.

The photos are the ones scikit-image ships inside its wheel (``skimage/data/``: astronaut, cat,
coffee, coins, the moon, a retina...), read as files, so nothing is downloaded and scikit-image
need not be importable (``scripts/setup.sh`` installs it as a data package, like easy-vqa).

Each question is a random square crop (half to all of the short side, maybe mirrored) of one
photo, resized to the model's 192 px, asked with one of the scene question templates (colour,
shape at a position, count, relation, existence, word) with random attributes. The photos hold no
such shapes, so there is **no gold answer** (``answer`` is ``"unknown"``): the point is
*agreement* of a pruned model with the unpruned model's own answers on inputs unlike its
training data (``visipruner calibrate --heldout``, which needs no ground truth).

Splits are by photo, so a config tuned on ``calib`` is checked on photos it never saw:
``calib`` (9 photos) and ``test`` (10). The stereo pair ``motorcycle_left/right`` stays in one split.

``kind="objects"`` gives the photos questions *with* a gold answer: the ``index``-th generated
scene question of a scene split (``calib``: the scenes' ``validation`` stream, ``test``: their
``test`` stream) has its shapes and word drawn over the photo crop instead of its flat
background, so the answer is the scene's. Question ``i`` is then the same scene and question as
question ``i`` of ``python -m visipruner.data.scenes --split <stream>``: the two sources differ
only in the background (a paired comparison). ``strength`` blends the photo towards white
(1: the photo as it is; 0.5: halfway). The embedded model was trained on near-white backgrounds
only: it answers 0.33 of them at strength 1 (near chance) and 0.70 at 0.5 (120 test-split
questions; 0.925 for the same scenes on white), so 0.5 is the default: a shift the model still
answers under.

Command line::

    python -m visipruner.data.photos --split test --n 120 --out data/photos
    python -m visipruner.data.photos --kind objects --split test --n 120 --out data/photo_objects
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from . import scenes

SPLITS = {
    "calib": ["brick", "camera", "coffee", "coins", "ihc", "moon", "motorcycle_left", "motorcycle_right", "rocket"],
    "test": ["astronaut", "cell", "chelsea", "clock_motion", "grass", "gravel", "hubble_deep_field", "page",
             "retina", "text"],
}
SUFFIXES = (".png", ".jpg")
ANSWER = "unknown"  # no gold answer: score agreement with the unpruned model
KINDS = ("questions", "objects")
SCENE_STREAM = {"calib": "validation", "test": "test"}  # kind="objects": the scene stream drawn per split


def data_dir() -> Path:
    """scikit-image's bundled data folder, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the photo source needs scikit-image's bundled photos: "
                                "pip install --no-deps scikit-image==0.25.2 (scripts/setup.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def photo_path(name: str) -> Path:
    d = data_dir()
    for suffix in SUFFIXES:
        if (d / f"{name}{suffix}").is_file():
            return d / f"{name}{suffix}"
    raise FileNotFoundError(f"photo {name!r} not found in {d} (scikit-image 0.25.2 ships it)")


def _question(rng: np.random.Generator) -> tuple[str, str]:
    """(family, question) from the scene templates, attributes drawn at random."""
    family = scenes.FAMILIES[int(rng.integers(len(scenes.FAMILIES)))]
    color = lambda: scenes.COLOR_NAMES[int(rng.integers(len(scenes.COLOR_NAMES)))]  # noqa: E731
    shape = lambda: scenes.SHAPES[int(rng.integers(len(scenes.SHAPES)))]  # noqa: E731
    if family == "color":
        q = f"What color is the {shape()}?"
    elif family == "shape_at":
        q = f"What shape is at the {scenes.POSITIONS[int(rng.integers(len(scenes.POSITIONS)))]}?"
    elif family == "count":
        q = f"How many {color()} shapes are there?"
    elif family == "relation":
        q = f"Where is the {color()} {shape()} relative to the {color()} {shape()}?"
    elif family == "exist":
        q = f"Is there a {color()} {shape()}?"
    else:
        q = "What word is written?"
    return family, q


def _crop(name: str, rng: np.random.Generator) -> Image.Image:
    """A random square crop (half to all of the short side) of photo ``name``, resized to the
    scenes' size and mirrored half of the time."""
    img = Image.open(photo_path(name)).convert("RGB")
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.5, 1.0))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    img = img.crop((x, y, x + side, y + side)).resize((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), Image.BICUBIC)
    return ImageOps.mirror(img) if rng.random() < 0.5 else img


def make_question(seed: int, split: str, index: int, kind: str = "questions",
                  strength: float = 0.5) -> tuple[Image.Image, dict]:
    """The ``index``-th photo question of ``split`` and ``kind`` (deterministic in ``(seed, split,
    index)``): the image and its question-file record (without the image path). ``strength``
    (``kind="objects"`` only): how much of the photo shows under the shapes, in [0, 1]."""
    if split not in SPLITS:
        raise ValueError(f"unknown photo split {split!r}; expected one of {list(SPLITS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown photo question kind {kind!r}; expected one of {list(KINDS)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1]; got {strength}")
    names = SPLITS[split]
    name = names[index % len(names)]  # every photo equally often
    rng = np.random.default_rng([int(seed), list(SPLITS).index(split), index, 57])
    img = _crop(name, rng)
    if kind == "questions":
        family, q = _question(rng)
        return img, {"question": q, "answer": ANSWER, "family": f"photo_{family}",
                     "id": f"photo-{split}-{seed}-{index}-{name}"}
    sq = scenes.make_question(seed, SCENE_STREAM[split], index)
    img = sq.scene.render(Image.blend(Image.new("RGB", img.size, (255, 255, 255)), img, strength))
    return img, {"question": sq.question, "answer": sq.answer, "family": f"photo_{sq.family}",
                 "id": f"photo_objects{round(strength * 100)}-{split}-{seed}-{index}-{name}"}


def write_split(out_dir: str, split: str = "test", n: int = 120, seed: int = 0, kind: str = "questions",
                strength: float = 0.5) -> str:
    """Write ``n`` questions of ``split`` as ``<out_dir>/<split>.jsonl`` + PNGs; returns the JSONL path."""
    img_dir = os.path.join(out_dir, f"{split}_images")
    os.makedirs(img_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{split}.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            img, rec = make_question(seed, split, i, kind, strength)
            name = f"{rec['id']}.png"
            img.save(os.path.join(img_dir, name))
            f.write(json.dumps({"image": f"{split}_images/{name}", **rec}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write photo questions (scikit-image's bundled photos) as JSONL + PNGs.")
    p.add_argument("--split", default="test", choices=list(SPLITS))
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", default="questions", choices=list(KINDS),
                   help="questions: scene questions on the bare photo, no gold answer; objects: the scene's "
                   "shapes and word drawn over the photo, gold answer from the scene")
    p.add_argument("--strength", type=float, default=0.5,
                   help="--kind objects: the photo blended towards white, 1 = as it is (default 0.5)")
    p.add_argument("--out", default="data/photos")
    a = p.parse_args(argv)
    if not 0.0 <= a.strength <= 1.0:
        p.error(f"--strength must be in [0, 1]; got {a.strength}")
    print(write_split(a.out, a.split, a.n, a.seed, a.kind, a.strength))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
