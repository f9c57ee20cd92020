"""The bench's data (the fresh test split) and its timing arithmetic: interleaving and intervals."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import visipruner.bench as bench
from visipruner import VisiPrunerConfig
from visipruner.data import easyvqa, scenes
from visipruner.testing import tiny_llava

from fakes import FakeProcessor, FakeQuestion

torch.set_grad_enabled(False)
ROOT = Path(__file__).resolve().parents[1]


def _calibration_script():
    spec = importlib.util.spec_from_file_location("calibration_data", ROOT / "scripts" / "calibration_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_bench_draws_from_the_fresh_test_split(tmp_path):
    qs = bench.default_questions(True, root=tmp_path)
    scene_qs, easy_qs = qs[:24], qs[24:]
    assert len(scene_qs) == 24 and len(easy_qs) == 8
    expected = scenes.make_questions(0, "test", 24)
    assert [(q.id, q.question, q.answer) for q in scene_qs] == [(e.id, e.question, e.answer) for e in expected]
    # the images on disk are the test split's scenes, not the dev split's (same ids before the rename)
    for q, e in zip(scene_qs[:3], expected[:3]):
        assert np.array_equal(np.asarray(q.load_image().convert("RGB")), np.asarray(e.scene.render()))
        assert not np.array_equal(np.asarray(q.load_image().convert("RGB")),
                                  np.asarray(scenes.make_question(0, "dev", int(q.id.rsplit("-", 1)[1])).scene.render()))
    # easy-vqa: test questions, none of them in calibration's held-out set
    heldout = {r["id"] for r in _calibration_script().every_nth(easyvqa.records("test"), 40)}
    assert all(q.id.startswith("easyvqa-test-") for q in easy_qs)
    assert len({q.id for q in easy_qs}) == 8 and not {q.id for q in easy_qs} & heldout


def test_every_nth_spreads_evenly():
    assert _calibration_script().every_nth(list(range(10)), 3) == [0, 3, 6]


def test_ratio_interval_against_hand_computed_cases():
    # pruned is exactly twice unpruned on every prompt: no spread at all
    assert bench._ratio_interval([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx([2.0, 2.0])
    # per-prompt ratios 1, 2, 3 with equal weights: the interval lies inside [1, 3] and holds 2
    lo, hi = bench._ratio_interval([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    assert 1.0 <= lo < 2.0 < hi <= 3.0


def test_realised_over_modelled_interval_by_hand():
    # a = 1 s, b = 0.1 s per token; pruned prompt has 10 tokens in both layers, unpruned 20
    fit = bench.LayerTimeFit((1.0, 0.1, 0.0), np.tile([1.0, 0.1, 0.0], (50, 1)))
    ci = bench._realised_over_modelled_interval(fit, [[10, 10], [10, 10]], [20, 20], 2, [1.0, 1.0], [2.0, 2.0])
    # modelled ratio (2 * 2) / (2 * 3) = 2/3; measured 1/2; realised/modelled = (2/3) / (1/2)
    assert ci == pytest.approx([4 / 3, 4 / 3])


def test_layer_time_fit_has_draws_around_it():
    model = tiny_llava(0, layers=2, image_size=32)
    fit = bench.fit_layer_time(model, 40, repeats=3)
    assert len(fit.coef) == 3 and fit.draws.shape == (bench.BOOTSTRAP_DRAWS, 3)
    assert np.isfinite(fit.draws).all()


class _Recorder:
    """Wraps ``bench.apply`` and logs whether each decode step ran with pruning on."""

    def __init__(self, model, monkeypatch):
        self.active, self.log = False, []
        real = bench.apply
        rec = self

        class Handle:
            def __init__(self, h):
                self.h = h

            def __getattr__(self, name):
                return getattr(self.h, name)

            def remove(self):
                rec.active = False
                self.h.remove()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.remove()

        def apply(m, cfg, **kw):
            self.active = True
            return Handle(real(m, cfg, **kw))

        monkeypatch.setattr(bench, "apply", apply)

        def pre_hook(module, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is not None and ids.shape[1] == 1:  # a decode step
                self.log.append("P" if self.active else "U")

        model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def runs(self):
        out = []
        for x in self.log:
            if out and out[-1][0] == x:
                out[-1][1] += 1
            else:
                out.append([x, 1])
        return out


def test_decode_timing_interleaves_pruned_and_unpruned_on_every_prompt(monkeypatch):
    model = tiny_llava(0, layers=4, image_size=64)
    rec = _Recorder(model, monkeypatch)
    cfg = VisiPrunerConfig(shallow_layers=1, layer_threshold=1.0, tokens_threshold=0.0, exit_threshold=0.0)
    prompts, repeats, steps = 3, 2, 3
    out = bench.time_prefill_and_decode(model, FakeProcessor(model), [FakeQuestion(i) for i in range(prompts)],
                                        cfg, repeats=repeats, decode_steps=steps)
    runs = rec.runs()
    # warm-up pair, then per prompt and repeat one unpruned and one pruned block of `steps` steps
    assert [r[0] for r in runs] == ["U", "P"] * (1 + prompts * repeats)
    assert all(n == steps for _, n in runs)
    assert len(out["decode_ms_per_token_per_prompt"]) == prompts == out["timed_prompts"]
    assert len(out["decode_ms_per_token_unpruned_per_prompt"]) == prompts
    lo, hi = out["decode_latency_ratio_ci"]
    assert lo <= out["decode_latency_ratio"] <= hi and isinstance(out["decode_slower"], bool)
    assert out["decode_slower"] == (lo > 1.0)
    lo, hi = out["prefill_latency_ratio_ci"]
    assert lo <= out["prefill_latency_ratio"] <= hi
    assert "realised_over_predicted_ci" in out


def test_timing_notes_name_the_slower_settings():
    rows = [
        {"method": "unpruned", "setting": "default", "prefill_ms": 10.0, "prefill_ms_unpruned": 10.0,
         "prefill_latency_ratio_ci": [0.98, 1.02], "decode_latency_ratio": 1.0, "decode_latency_ratio_ci": [0.99, 1.01],
         "decode_ms_per_token_unpruned": 5.0},
        {"method": "fastv", "setting": "matched", "decode_latency_ratio": 1.2, "decode_slower": True,
         "decode_ms_per_token_unpruned": 5.5},
        {"method": "dart", "setting": "default", "decode_latency_ratio": 0.9, "decode_slower": False,
         "decode_ms_per_token_unpruned": 4.5},
    ]
    notes = "\n".join(bench.timing_notes(rows))
    assert "fastv/matched (1.200)" in notes and "dart" not in notes
    assert "range 4.50-5.50 (20% of the median)" in notes
