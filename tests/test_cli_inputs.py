"""Bad input through the command line, as a user types it: one line naming the culprit, exit
status 2, and no model loaded (the loaders are replaced by ones that fail loudly)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

import visipruner.models
import visipruner.models.organism
from visipruner import cli
from visipruner.inputs import InputError


class ModelLoaded(Exception):
    """Raised by the stand-in loaders: validation let the command through to the model."""


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(visipruner.models, "load_organism", refuse)
    monkeypatch.setattr(visipruner.models.organism, "load_organism", refuse)
    monkeypatch.setattr(visipruner.models.organism, "load_model_dir", refuse)


GOOD = {"image": "img.png", "question": "What colour?", "answer": "red"}


@pytest.fixture
def files(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "img.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")

    def write(name, lines):
        (tmp_path / name).write_text("".join(line + "\n" for line in lines))

    good = json.dumps(GOOD)
    write("good.jsonl", [good, good])
    write("badjson.jsonl", [good, "{not json"])
    write("noanswer.jsonl", [good, good, json.dumps({"image": "img.png", "question": "Q"})])
    write("emptyimg.jsonl", [good, json.dumps({**GOOD, "image": "empty.png"})])
    write("textimg.jsonl", [json.dumps({**GOOD, "image": "text.png"})])
    write("noimg.jsonl", [json.dumps({**GOOD, "image": "gone.png"})])
    write("blank.jsonl", [""])
    (tmp_path / "fastv.json").write_text('{"method": "fastv"}')
    (tmp_path / "badcfg.json").write_text('{"method": "visipruner", "layer_threshold": 7}')
    (tmp_path / "model").mkdir()
    return tmp_path


def run(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def _d(files, name):
    return str(files / name)


# (command line with {d} for the data folder, what the one line must say)
CASES = [
    # a question file: missing, malformed, unreadable image, empty
    ("eval --data {d}/missing.jsonl", "--data: {d}/missing.jsonl: no such file"),
    ("eval --data {d}", "--data: {d}: not a file"),
    ("eval --data {d}/badjson.jsonl", "{d}/badjson.jsonl:2: invalid JSON"),
    ("eval --data {d}/noanswer.jsonl", "{d}/noanswer.jsonl:3: missing required key(s) 'answer'"),
    ("eval --data {d}/emptyimg.jsonl", "{d}/emptyimg.jsonl:2: key 'image': {d}/empty.png cannot be read as an image"),
    ("eval --data {d}/textimg.jsonl", "{d}/textimg.jsonl:1: key 'image': {d}/text.png cannot be read as an image"),
    ("eval --data {d}/noimg.jsonl", "{d}/noimg.jsonl:1: image file not found: {d}/gone.png"),
    ("eval --data {d}/blank.jsonl", "--data: {d}/blank.jsonl: no questions"),
    ("eval --data {d}/img.png", "--data: {d}/img.png: not UTF-8 text"),
    # numbers out of range are refused, not ignored
    ("eval --data {d}/good.jsonl --limit 0", "--limit must be >= 1, got 0"),
    ("eval --data {d}/good.jsonl --batch-size 0", "--batch-size must be >= 1, got 0"),
    ("eval --data {d}/good.jsonl --model {d}/nowhere", "--model: {d}/nowhere: no such directory"),
    ("eval --data {d}/good.jsonl --model {d}/model", "--model: {d}/model: no config.json"),
    ("eval --data {d}/good.jsonl --weights {d}/model", "--weights: {d}/model: no organism.safetensors"),
    ("eval --data {d}/good.jsonl --json {d}", "--json: {d} is a directory"),
    ("bench --data {d}/missing.jsonl", "--data: {d}/missing.jsonl: no such file"),
    ("bench --data {d}/badjson.jsonl", "{d}/badjson.jsonl:2: invalid JSON"),
    ("bench --data {d}/good.jsonl --limit 0", "--limit must be >= 1, got 0"),
    ("bench --data {d}/good.jsonl --methods fastv,nope", "--methods: unknown name(s) nope; choose from visipruner,"),
    ("bench --data {d}/good.jsonl --methods=", "--methods: no names given"),
    ("bench --data {d}/good.jsonl --methods ,", "--methods: no names given"),
    ("bench --data {d}/good.jsonl --visipruner-config {d}/fastv.json", "not a VisiPrunerConfig: method='fastv'"),
    ("bench --data {d}/good.jsonl --visipruner-config {d}/badcfg.json", "--visipruner-config: {d}/badcfg.json: "),
    ("bench --data {d}/good.jsonl --visipruner-config {d}/nocfg.json", "--visipruner-config: {d}/nocfg.json: no such file"),
    ("bench --data {d}/good.jsonl --decode-steps 0", "--decode-steps must be >= 1, got 0"),
    ("calibrate --data {d}/good.jsonl --target agreement", "--target must look like agreement=0.99"),
    ("calibrate --data {d}/good.jsonl --target flops=1.5", "--target: kind must be 'agreement' or 'flops'"),
    ("calibrate --data {d}/good.jsonl --target speed=0.5", "--target: kind must be 'agreement' or 'flops'"),
    ("calibrate --data {d}/good.jsonl --target agreement=0.9 --shallow-layers 2,x", "--shallow-layers: expected K or K:off"),
    ("calibrate --data {d}/good.jsonl --target agreement=0.9 --shallow-layers=", "--shallow-layers: no values given"),
    ("calibrate --data {d}/good.jsonl --target agreement=0.9 --shallow-layers 0", "--shallow-layers: expected K or K:off"),
    ("calibrate --data {d}/badjson.jsonl --target agreement=0.9", "{d}/badjson.jsonl:2: invalid JSON"),
    ("calibrate --data {d}/good.jsonl --target agreement=0.9 --heldout {d}/missing.jsonl",
     "--heldout: {d}/missing.jsonl: no such file"),
    ("calibrate --data {d}/good.jsonl --target agreement=0.9 --heldout {d}/emptyimg.jsonl",
     "{d}/emptyimg.jsonl:2: key 'image'"),
    ("calibrate --data {d}/good.jsonl --target agreement=0.9 --limit 0", "--limit must be >= 1, got 0"),
    ("calibrate --data {d}/good.jsonl --target agreement=0.9 --heldout-limit 5", "--heldout-limit needs --heldout"),
    ("calibrate --data {d}/good.jsonl --target agreement=0.9 --fallback-layers 6,x", "--fallback-layers: expected layer"),
    ("calibrate --data {d}/good.jsonl --target agreement=0.9 --budgets 0.2,1.5", "--budgets: expected keep ratios"),
    ("calibrate --data {d}/good.jsonl --target agreement=0.9 --min-pruned 1.5", "--min-pruned must be in [0, 1]"),
    ("calibrate --data a={d}/good.jsonl --data b={d}/missing.jsonl --target agreement=0.9",
     "--data: {d}/missing.jsonl: no such file"),
    ("analyze --data {d}/badjson.jsonl --out {d}/o", "bad question file (--data): {d}/badjson.jsonl:2: invalid JSON"),
    ("analyze --data {d}/good.jsonl --out {d}/o --limit 0", "--limit must be >= 1, got 0"),
    ("analyze --data {d}/good.jsonl --out {d}/o --tolerance 0", "--tolerance must be > 0, got 0.0"),
    ("analyze --data {d}/good.jsonl --out {d}/o --window 0", "--window must be >= 1, got 0"),
    ("analyze --data {d}/good.jsonl --out {d}/o --config {d}/fastv.json", "not a VisiPrunerConfig"),
    ("analyze --data {d}/good.jsonl --out {d}/o --config {d}/nocfg.json", "--config: {d}/nocfg.json: no such file"),
    ("analyze --data {d}/good.jsonl --out {d}/good.jsonl", "--out: cannot create the folder {d}/good.jsonl"),
]


@pytest.mark.parametrize("line, needle", CASES, ids=[c[0].split(" --")[0] + ":" + c[1][:40] for c in CASES])
def test_bad_input_is_one_line_exit_2_before_the_model_loads(files, capsys, line, needle):
    argv = line.format(d=files).split(" ")
    rc, err = run(argv, capsys)  # a ModelLoaded exception here means validation came too late
    command = argv[0]
    assert rc == 2
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line, no traceback
    assert err.startswith(f"visipruner {command}: error: "), err
    assert needle.format(d=files) in err, err


@pytest.mark.parametrize("line", [
    "eval --data {d}/good.jsonl --limit 1",
    "eval --data {d}/good.jsonl --model {d}/model",  # with a config.json: see below
    "bench --data {d}/good.jsonl --methods visipruner,fastv",
    "calibrate --data {d}/good.jsonl --target flops=0.5 --shallow-layers 2,2:off --heldout {d}/good.jsonl",
    "calibrate --data a={d}/good.jsonl --data b={d}/good.jsonl --target flops=0.5 --fallback-layers none,6 "
    "--budgets 0.2 --heldout a={d}/good.jsonl --heldout b={d}/good.jsonl",
    "analyze --data {d}/good.jsonl --out {d}/o --config {d}/vp.json",
])
def test_good_input_reaches_the_model_loader(files, line):
    """The other side of the cases above: valid input gets as far as loading the model."""
    (files / "model" / "config.json").write_text("{}")
    (files / "vp.json").write_text('{"method": "visipruner", "shallow_layers": 1}')
    with pytest.raises(ModelLoaded):
        cli.main(line.format(d=files).split(" "))


def test_debug_shows_the_traceback(files):
    with pytest.raises(InputError, match="--limit must be >= 1"):
        cli.main(["eval", "--data", _d(files, "good.jsonl"), "--limit", "0", "--debug"])


def test_internal_errors_keep_their_traceback(files, monkeypatch):
    """Only input errors become one line; a TypeError inside analyze is a bug and propagates."""
    import visipruner.analyze

    monkeypatch.setattr(visipruner.models, "load_organism", lambda *a, **k: (object(), object()))

    def broken(*args, **kwargs):
        raise TypeError("internal bug")

    monkeypatch.setattr(visipruner.analyze, "analyze", broken)
    with pytest.raises(TypeError, match="internal bug"):
        cli.main(["analyze", "--data", _d(files, "good.jsonl"), "--out", _d(files, "o")])


def test_installed_command_exits_2_with_one_line(files):
    """The real process, as a shell sees it: status 2 and a single line on stderr."""
    p = subprocess.run([sys.executable, "-m", "visipruner.cli", "eval", "--data", _d(files, "badjson.jsonl")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"visipruner eval: error: bad question file (--data): {files}/badjson.jsonl:2: invalid JSON "
        "(Expecting property name enclosed in double quotes at column 2)"]


@pytest.mark.parametrize("line, needle", [
    ("calibrate --data {d}/good.jsonl --target agreement=0.9 --shallow-layers 2,4",
     "--shallow-layers: K must be below the model's 4 layers, got '2,4'"),
    ("calibrate --data {d}/good.jsonl --target agreement=0.9 --fallback-layers 3,4",
     "--fallback-layers: layers must be below the model's 4 layers, got '3,4'"),
    ("analyze --data {d}/good.jsonl --out {d}/o --config {d}/k4.json",
     "config.shallow_layers=4 must be below the model's 4 layers"),
])
def test_input_errors_found_once_the_model_is_known_are_one_line_too(files, capsys, monkeypatch, line, needle):
    """Depth-dependent checks need the model's config: still one line and status 2, before any work."""
    from visipruner.testing import tiny_llava

    monkeypatch.setattr(visipruner.models, "load_organism", lambda *a, **k: (tiny_llava(0, layers=4), None))
    (files / "k4.json").write_text('{"method": "visipruner", "shallow_layers": 4}')
    rc, err = run(line.format(d=files).split(" "), capsys)
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
