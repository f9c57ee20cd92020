"""Data: scene generator determinism/balance, question-file reader, easy-vqa converter."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os

import numpy as np
import pytest

from visipruner.data import easyvqa, scenes
from visipruner.data.questions import Question, load_questions, write_questions


def _digest(qs):
    h = hashlib.sha256()
    for q in qs:
        h.update(f"{q.family}|{q.question}|{q.answer}".encode())
        h.update(q.scene.render().tobytes())
    return h.hexdigest()


def test_generator_deterministic_by_seed():
    a = scenes.make_questions(seed=3, split="train", n=24)
    b = scenes.make_questions(seed=3, split="train", n=24)
    c = scenes.make_questions(seed=4, split="train", n=24)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    # the i-th question does not depend on how many were generated before it
    assert _digest(scenes.make_questions(3, "train", 4, start=20)) == _digest(a[20:])


def test_splits_differ():
    digests = {s: _digest(scenes.make_questions(0, s, 12)) for s in ("train", "validation", "dev", "test")}
    assert len(set(digests.values())) == 4
    with pytest.raises(ValueError):
        scenes.make_question(0, "holdout", 0)


def _scene_key(scene):
    return repr(scene)  # every field: objects (shape, colour, size, cell, offsets), word, background


def test_test_split_shares_no_scene_with_what_training_and_calibration_read():
    """The reported test split (its first 1200 questions) against: training's question and scene
    streams (the indices train.py draws from, first 3000 of each), calibration's validation
    questions, and the dev split (what training scored, calibration's held-out set, the smoke test
    and check_cost blocks)."""
    test = {_scene_key(q.scene) for q in scenes.make_questions(0, "test", 1200)}
    assert len(test) == 1200
    seen = set()
    seen |= {_scene_key(q.scene) for q in scenes.make_questions(0, "train", 3000, start=10_000_000)}
    seen |= {_scene_key(scenes.random_scene(0, "train", i)) for i in range(3000)}
    seen |= {_scene_key(scenes.random_scene(0, "train", 20_000_000 + i)) for i in range(1000)}
    seen |= {_scene_key(q.scene) for q in scenes.make_questions(0, "validation", 600)}
    seen |= {_scene_key(q.scene) for q in scenes.make_questions(0, "dev", 600)}
    seen |= {_scene_key(q.scene) for q in scenes.make_questions(0, "dev", 30, start=6000)}
    seen |= {_scene_key(q.scene) for q in scenes.make_questions(0, "dev", 64, start=7000)}
    seen |= {_scene_key(scenes.random_scene(0, "dev", i)) for i in range(64)}  # the vision probe
    assert len(seen) > 8000  # the streams are themselves varied, so an empty overlap means something
    assert not test & seen


def test_dev_split_is_the_former_test_stream():
    # published development figures (calibration's held-out set, the smoke test, training's
    # scores) were made on stream 2 under the name "test"; "dev" must reproduce them exactly
    q = scenes.make_question(0, "dev", 0)
    assert scenes.SPLITS["dev"] == 2 and scenes.SPLITS["test"] == 3
    assert (q.family, q.question, q.answer) == ("color", "What color is the square?", "red")  # as in eval_scenes_dev600.json


def test_families_and_answers_balanced():
    fams = scenes.FAMILIES
    n_ans = {f: len(scenes.ANSWERS[f]) for f in fams}
    # 12 is a multiple of every family's answer count
    n = len(fams) * 12
    qs = scenes.make_questions(1, "validation", n)
    by_fam = collections.Counter(q.family for q in qs)
    assert set(by_fam) == set(fams) and len(set(by_fam.values())) == 1
    for f in fams:
        cnt = collections.Counter(q.answer for q in qs if q.family == f)
        assert set(cnt) == set(scenes.ANSWERS[f])
        assert len(set(cnt.values())) == 1, (f, cnt, n_ans[f])


def test_questions_are_consistent_with_scene():
    for q in scenes.make_questions(2, "test", 120):
        s = q.scene
        cells = [o.cell for o in s.objects] + [s.word_cell]
        assert len(set(cells)) == len(cells)
        if q.family == "count":
            color = q.question.split()[2]
            assert sum(o.color == color for o in s.objects) == int(q.answer)
        elif q.family == "exist":
            words = q.question.rstrip("?").split()
            color, shape = words[-2], words[-1]
            present = any(o.color == color and o.shape == shape for o in s.objects)
            assert present == (q.answer == "yes")
        elif q.family == "word":
            assert s.word == q.answer
        elif q.family == "shape_at":
            pos = q.question[len("What shape is at the "):-1]
            cell = scenes.POSITIONS.index(pos)
            assert [o.shape for o in s.objects if o.cell == cell] == [q.answer]
        elif q.family == "relation":
            rest = q.question[len("Where is the "):-1]
            a_ref, b_ref = rest.split(" relative to the ")
            find = lambda ref: [o for o in s.objects if f"{o.color} {o.shape}" == ref]
            (a,), (b,) = find(a_ref), find(b_ref)
            ra, ca = divmod(a.cell, 3)
            rb, cb = divmod(b.cell, 3)
            expect = {"left": ra == rb and ca < cb, "right": ra == rb and ca > cb,
                      "above": ca == cb and ra < rb, "below": ca == cb and ra > rb}
            assert expect[q.answer]


def test_scene_questions_answers_match_scene():
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(30):
        s = scenes.random_scene(0, "train", i)
        for fam, q, a in scenes.scene_questions(s, rng):
            if fam == "count":
                assert sum(o.color == q.split()[2] for o in s.objects) == int(a)
            if fam == "word":
                assert a == s.word


def test_write_split_roundtrip(tmp_path):
    path = scenes.write_split(str(tmp_path / "sc"), "test", n=12, seed=0)
    qs = load_questions(path)
    assert len(qs) == 12
    ref = scenes.make_questions(0, "test", 12)
    assert [q.answer for q in qs] == [r.answer for r in ref]
    assert all(os.path.isabs(q.image) and os.path.exists(q.image) for q in qs)
    rel = [json.loads(line)["image"] for line in open(path)]
    assert not any(os.path.isabs(r) for r in rel)
    img = qs[0].load_image()
    assert img.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    assert img.tobytes() == ref[0].scene.render().tobytes()


def _write(tmp_path, lines, name="q.jsonl"):
    (tmp_path / "img.png").write_bytes(b"")  # existence is all the reader checks
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = '{"image": "img.png", "question": "What?", "answer": "red", "family": "color", "id": "a"}'


def test_reader_accepts_good_file(tmp_path):
    p = _write(tmp_path, [GOOD, "", '{"image": "img.png", "question": "Q", "answer": "A"}'])
    qs = load_questions(p)
    assert len(qs) == 2
    assert qs[0] == Question(image=str(tmp_path / "img.png"), question="What?", answer="red", family="color", id="a")
    assert qs[1].family == "all"


@pytest.mark.parametrize("bad, needle", [
    ('{"image": "img.png", "question": "Q"', "invalid JSON"),
    ('["img.png", "Q", "A"]', "expected a JSON object"),
    ('{"image": "img.png", "question": "Q"}', "missing required key(s) 'answer'"),
    ('{"image": "img.png", "question": "Q", "answer": 3}', "'answer' must be a string"),
    ('{"image": "img.png", "question": "  ", "answer": "a"}', "'question' is empty"),
    ('{"image": "nope.png", "question": "Q", "answer": "a"}', "image file not found"),
    ('{"image": "img.png", "question": "Q", "answer": "a", "family": [1]}', "'family' must be a string"),
])
def test_reader_rejects_malformed_line(tmp_path, bad, needle):
    p = _write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ValueError) as ei:
        load_questions(p)
    msg = str(ei.value)
    assert f"{p}:3:" in msg, msg
    assert needle in msg, msg


def test_write_questions_relative(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    q = Question(image=str(tmp_path / "img.png"), question="Q", answer="A", family="f", id="1")
    write_questions(tmp_path / "out.jsonl", [q])
    assert json.loads((tmp_path / "out.jsonl").read_text())["image"] == "img.png"
    assert load_questions(tmp_path / "out.jsonl") == [q]


def test_easyvqa_converter(tmp_path):
    path = easyvqa.write_jsonl(str(tmp_path), "test", limit=50)
    qs = load_questions(path)
    assert len(qs) == 50
    assert {q.family for q in qs} <= {"yesno", "shape", "color"}
    for q in qs:
        if q.family == "shape":
            assert q.answer in easyvqa.SHAPES
        if q.family == "color":
            assert q.answer in easyvqa.COLORS
    train_imgs = {r["image"] for r in easyvqa.records("train")}
    test_imgs = {r["image"] for r in easyvqa.records("test")}
    assert not train_imgs & test_imgs


def test_train_head_weights_parse():
    import argparse

    from visipruner.models.train import _weights

    assert _weights("word=3,shape=2") == {"word": 3.0, "shape": 2.0}
    assert _weights("") == {}
    for bad in ("nose=2", "word", "word="):
        with pytest.raises(argparse.ArgumentTypeError, match="HEAD=WEIGHT"):
            _weights(bad)


def test_train_head_losses_weights_and_unsupervised_heads():
    import numpy as np
    import torch
    import torch.nn.functional as F

    from visipruner.models.train import head_losses

    torch.manual_seed(0)
    logits = {"color": torch.randn(2, 4, 3), "lin_color": torch.randn(2, 4, 3), "word": torch.randn(2, 4, 5)}
    labs = [{"color": np.array([0, 1, 2, -100]), "word": np.full(4, -100)},
            {"color": np.array([2, -100, 1, 0]), "word": np.full(4, -100)}]
    out = head_losses(logits, labs, {"color": 3.0})
    assert set(out) == {"color", "lin_color"}  # no supervised word patch: left out
    tgt = torch.tensor([0, 1, 2, -100, 2, -100, 1, 0])
    torch.testing.assert_close(out["color"], 3.0 * F.cross_entropy(logits["color"].reshape(-1, 3), tgt))
    torch.testing.assert_close(out["lin_color"], 3.0 * F.cross_entropy(logits["lin_color"].reshape(-1, 3), tgt))


def test_train_position_labels_follow_the_renderer():
    """Row/column labels (the words 'top'.. / 'left'.. in the alignment target) come from the grid
    cell of every foreground patch; background is class 0 and easy-vqa images are unsupervised."""
    from PIL import Image

    from visipruner.models.train import COL_WORDS, ROW_WORDS, easyvqa_patch_labels, scene_patch_labels

    sc = scenes.random_scene(0, "train", 7)
    lab = scene_patch_labels(sc)
    per_cell = scenes.CELL // 16
    g = scenes.IMAGE_SIZE // 16
    for o in sc.objects:
        r, c = divmod(o.cell, scenes.GRID)
        # the patch at the centre of the object's cell shows the object
        centre = (r * per_cell + per_cell // 2) * g + c * per_cell + per_cell // 2
        assert lab["shape"][centre] > 0
        assert ROW_WORDS[lab["row"][centre] - 1] == ["top", "middle", "bottom"][r]
        assert COL_WORDS[lab["col"][centre] - 1] == ["left", "center", "right"][c]
    bg = lab["shape"] == 0
    assert bg.any() and (lab["row"][bg] == 0).all() and (lab["col"][bg] == 0).all()
    ev = easyvqa_patch_labels(Image.new("RGB", (64, 64), "white"), {"color": "red", "shape": "circle"}, g, 192)
    assert (ev["row"] == -100).all() and (ev["col"] == -100).all()


def test_train_lm_schedule_restart():
    from visipruner.models.train import lm_lr_factor

    assert lm_lr_factor(0, 700) == pytest.approx(1 / 20)
    assert lm_lr_factor(100, 700) == pytest.approx(0.5 * (1 + math.cos(math.pi * 100 / 700)))
    assert lm_lr_factor(700, 1000) < 0.25  # continuing the old cosine: already low
    assert lm_lr_factor(700, 1000, start=700) == pytest.approx(1 / 20)  # restarted: warm-up again
    assert lm_lr_factor(720, 1000, start=700) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 300)))
    assert lm_lr_factor(1000, 1000, start=700) == pytest.approx(0.05)


def test_relation_questions_cover_every_aligned_pair_both_ways():
    import collections

    for i in range(40):
        sc = scenes.random_scene(0, "train", i)
        qs = scenes.relation_questions(sc)
        ans = collections.Counter(a for _, a in qs)
        assert ans["left"] == ans["right"] and ans["above"] == ans["below"]
        aligned = sum(1 for a in sc.objects for b in sc.objects if a is not b
                      and (a.cell // scenes.GRID == b.cell // scenes.GRID or a.cell % scenes.GRID == b.cell % scenes.GRID))
        assert len(qs) <= aligned
        rng = np.random.default_rng(i)
        for fam, q, a in scenes.scene_questions(sc, rng):
            if fam == "relation":
                assert (q, a) in qs


def test_photo_questions(tmp_path, monkeypatch):
    """scikit-image's bundled photos: deterministic crops and questions, splits by photo, files that
    the question reader accepts; a missing scikit-image is named with the fix."""
    from visipruner.data import photos

    assert not set(photos.SPLITS["calib"]) & set(photos.SPLITS["test"])
    for split, names in photos.SPLITS.items():
        assert all(photos.photo_path(n).is_file() for n in names), split
    img, rec = photos.make_question(0, "test", 3)
    img2, rec2 = photos.make_question(0, "test", 3)
    assert rec == rec2 and img.tobytes() == img2.tobytes() and img.size == (192, 192)
    assert rec["id"].endswith(photos.SPLITS["test"][3]) and rec["family"].startswith("photo_")
    assert photos.make_question(1, "test", 3)[0].tobytes() != img.tobytes()  # another seed, another crop
    path = photos.write_split(str(tmp_path), "calib", n=12)
    qs = load_questions(path, verify_images=True)
    assert len(qs) == 12 and {q.id.rsplit("-", 1)[-1] for q in qs} <= set(photos.SPLITS["calib"])
    assert len({q.id.split("-", 4)[-1] for q in qs}) == len(photos.SPLITS["calib"])  # every photo used
    monkeypatch.setattr(photos.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="scikit-image==0.25.2"):
        photos.make_question(0, "test", 0)


def test_photo_objects(tmp_path):
    """kind="objects": the scene split's question i drawn over photo i's crop. Its gold answer is the
    scene's; at strength 0 the image is exactly the scene on white (the shapes and word are drawn
    as on a scene), at strength 1 the photo shows unchanged where nothing is drawn; ids name the
    strength, so files at two strengths never share an id."""
    from visipruner.data import photos, scenes

    for split, stream in photos.SCENE_STREAM.items():
        sq = scenes.make_question(0, stream, 5)
        img0, rec = photos.make_question(0, split, 5, "objects", 0.0)
        assert (rec["question"], rec["answer"], rec["family"]) == (sq.question, sq.answer, f"photo_{sq.family}")
        white = dataclasses.replace(sq.scene, background=(255, 255, 255)).render()
        assert img0.tobytes() == white.tobytes()
        photo, _ = photos.make_question(0, split, 5)  # the same crop, no shapes
        img1, rec1 = photos.make_question(0, split, 5, "objects", 1.0)
        a, b, w = (np.asarray(x, dtype=int) for x in (img1, photo, white))
        background = (w == 255).all(-1)  # where nothing is drawn
        assert background.mean() > 0.5 and (a[background] == b[background]).all()
        assert not (a[~background] == b[~background]).all(-1).all()  # the shapes hide the photo
        assert rec1["id"] != rec["id"] and rec1["id"].endswith(photos.SPLITS[split][5 % len(photos.SPLITS[split])])
    path = photos.write_split(str(tmp_path), "test", n=6, kind="objects")
    qs = load_questions(path, verify_images=True)
    assert [q.answer for q in qs] == [scenes.make_question(0, "test", i).answer for i in range(6)]
    with pytest.raises(ValueError, match="kind"):
        photos.make_question(0, "test", 0, "drawings")
    with pytest.raises(ValueError, match="strength"):
        photos.make_question(0, "test", 0, "objects", 1.5)
    with pytest.raises(ValueError, match="RGB 192x192"):
        scenes.render_scene(sq.scene, img0.resize((10, 10)))


def _agreement_script():
    """scripts/agreement.py as a module (scripts/ is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("agreement", Path(__file__).parents[1] / "scripts" / "agreement.py")
    agreement = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agreement)
    return agreement


def test_agreement_cache_key(tmp_path):
    """scripts/agreement.py caches unpruned answers by id *and* content: the same id over another
    image (a file regenerated at another strength) or another question gets another key."""
    from visipruner.data import photos

    agreement = _agreement_script()
    keys = {}
    for strength in (0.5, 1.0):
        path = photos.write_split(str(tmp_path / str(strength)), "test", n=2, kind="objects", strength=strength)
        for q in load_questions(path):
            keys[strength, q.question] = agreement.answer_key(dataclasses.replace(q, id="same"))
    assert len(set(keys.values())) == 4
    q = load_questions(path)[0]
    assert agreement.answer_key(q) == agreement.answer_key(dataclasses.replace(q))
    assert agreement.answer_key(q) != agreement.answer_key(dataclasses.replace(q, question=q.question + " "))


def test_agreement_split_by_correctness():
    """scripts/agreement.py: with gold answers, agreement where the unpruned model was right and where
    it was wrong, and the answers pruning turned right -> wrong / wrong -> right; nothing without gold."""
    agreement = _agreement_script()
    qs = [Question(image="x.png", question="q", answer=a) for a in ("red", "blue", "red", "green", "unknown")]
    unpruned = ["red", "blue", "blue", "red", "red"]  # right, right, wrong, wrong, (no gold)
    pruned = ["red", "red", "red", "red", "blue"]  # kept, right->wrong, wrong->right, kept (still wrong)
    out = agreement.by_correctness(qs, range(5), unpruned, pruned)
    assert out["unpruned_right"] == {"examples": 2, "agreement": 0.5}
    assert out["unpruned_wrong"] == {"examples": 2, "agreement": 0.5}
    assert (out["right_to_wrong"], out["wrong_to_right"]) == (1, 1)
    assert agreement.by_correctness(qs, [4], unpruned, pruned) == {}
