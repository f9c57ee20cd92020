"""Write the embedded model's calibration and held-out question files.

    python scripts/calibration_data.py --out runs/calib

calib.jsonl: 160 generated scenes (validation split) + 40 easy-vqa *train* questions.
heldout.jsonl: 100 generated scenes (dev split: never seen by the calibration search, but scored
during training, so a development set) + 40 easy-vqa test.  Nothing here reads the scene
test split, which is kept for reported accuracy.
"""

from __future__ import annotations

import argparse
import json
import os

from visipruner.data import easyvqa, scenes
from visipruner.data.questions import load_questions


def _absolute(path: str) -> list[dict]:
    return [{"image": q.image, "question": q.question, "answer": q.answer, "family": q.family, "id": q.id}
            for q in load_questions(path)]


def every_nth(rows: list, n: int) -> list:
    """``n`` rows spread evenly over ``rows`` (every len/n-th, from the first)."""
    step = max(1, len(rows) // max(1, n))
    return rows[::step][:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/calib")
    p.add_argument("--scenes-calib", type=int, default=160)
    p.add_argument("--easy-calib", type=int, default=40)
    p.add_argument("--scenes-heldout", type=int, default=100)
    p.add_argument("--easy-heldout", type=int, default=40)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    sets = {
        "calib": (scenes.write_split(os.path.join(a.out, "scenes"), "validation", n=a.scenes_calib, seed=0),
                  easyvqa.write_jsonl(os.path.join(a.out, "easyvqa"), "train"), a.easy_calib),
        "heldout": (scenes.write_split(os.path.join(a.out, "scenes"), "dev", n=a.scenes_heldout, seed=0),
                    easyvqa.write_jsonl(os.path.join(a.out, "easyvqa"), "test"), a.easy_heldout),
    }
    for name, (scene_path, easy_path, n_easy) in sets.items():
        easy = _absolute(easy_path)
        rows = _absolute(scene_path) + [dict(r, family="easyvqa_" + r["family"]) for r in every_nth(easy, n_easy)]
        path = os.path.join(a.out, f"{name}.jsonl")
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(path, len(rows))


if __name__ == "__main__":
    main()
