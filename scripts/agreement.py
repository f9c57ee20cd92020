"""Agreement with the unpruned model's answers, prefill FLOPs and pruning rate of method configs,
per source, with bootstrap intervals: the held-out check of a shipped config (no gold answers
needed, so it runs on photos too) and paired comparisons of configs on the same questions.

    python scripts/agreement.py --data scenes=runs/scenes/test.jsonl --data photos=runs/photos/test.jsonl \
        --limit 60 --config shipped=visipruner/models/organism/visipruner_config.json --config new=cfg.json \
        --json docs/results/heldout_agreement.json [--answers-cache runs/unpruned_answers.json]

Each ``--config NAME=FILE`` is any method's config JSON (``visipruner.config_from_json``). The
unpruned answers are computed once (and kept in ``--answers-cache``, if given, keyed by the
question's id, text and image bytes: a file regenerated with other images under the same ids, or
two files whose questions share ids, never reuse each other's answers).
For every pair of configs the paired difference of agreement per source carries a 95% bootstrap
interval: a gap is real only when that interval excludes 0. Where questions have gold answers,
agreement is also split by whether the unpruned answer was right, with the answers pruning turned
right -> wrong and wrong -> right.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
from pathlib import Path

import numpy as np


EXPERIMENTS = {  # config "method" -> (module beside this script, config class): variants not in the library
    "visipruner_diverse": ("diverse_variant", "DiverseVisiPrunerConfig"),
    "visipruner_input_set": ("input_set_variant", "InputSetVisiPrunerConfig"),
}


def bootstrap(values, seed: int = 0, n: int = 2000) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` (resampled questions, seeded)."""
    v = np.asarray(values, dtype=float)
    if not len(v):
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n, len(v)))
    means = v[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def answer_key(q) -> str:
    """The answers cache's key of a question: its id plus a digest of its text and image file."""
    digest = hashlib.sha256(q.question.encode() + b"\0" + Path(q.image).read_bytes()).hexdigest()[:16]
    return f"{q.id}|{digest}"


def by_correctness(questions, rows, unpruned, pruned) -> dict:
    """Where the questions have gold answers: agreement separately where the unpruned answer is right
    and where it is wrong, and how many answers pruning turned right -> wrong and wrong -> right (a
    guess the unpruned model gets wrong moves more easily than a right answer). Empty without gold."""
    from visipruner.data.photos import ANSWER
    from visipruner.evaluate import normalize_answer as norm

    rows = [i for i in rows if questions[i].answer != ANSWER]
    if not rows:
        return {}
    right = {i: norm(unpruned[i]) == norm(questions[i].answer) for i in rows}
    same = {i: norm(pruned[i]) == norm(unpruned[i]) for i in rows}
    out = {}
    for label, flag in (("unpruned_right", True), ("unpruned_wrong", False)):
        group = [i for i in rows if right[i] == flag]
        out[label] = {"examples": len(group), "agreement": float(np.mean([same[i] for i in group])) if group else None}
    out["right_to_wrong"] = sum(1 for i in rows if right[i] and norm(pruned[i]) != norm(questions[i].answer))
    out["wrong_to_right"] = sum(1 for i in rows if not right[i] and norm(pruned[i]) == norm(questions[i].answer))
    return out


def main(argv=None) -> int:
    import visipruner
    from visipruner.bench import _inputs
    from visipruner.calibrate import measure, read_sources
    from visipruner.evaluate import normalize_answer
    from visipruner.models import load_organism

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", required=True, help="NAME=FILE.jsonl, repeat per source")
    p.add_argument("--config", action="append", required=True, help="NAME=CONFIG.json, repeat")
    p.add_argument("--limit", type=int, help="first N questions of each source")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--answers-cache", help="JSON of unpruned answers by question id (read, then updated)")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    configs = {}
    for spec in a.config:
        name, _, path = spec.partition("=")
        text = Path(path).read_text()
        experiment = EXPERIMENTS.get(json.loads(text).get("method"))
        if experiment:  # an experiment beside this script
            module, cls = experiment
            configs[name] = getattr(importlib.import_module(module), cls).from_json(text)
        else:
            configs[name] = visipruner.config_from_json(text)
    questions, sources = read_sources(a.data, "--data", a.limit)
    model, processor = load_organism()
    prompts = [_inputs(processor, q, model) for q in questions]
    cache = json.loads(Path(a.answers_cache).read_text()) if a.answers_cache and Path(a.answers_cache).exists() else {}
    keys = [answer_key(q) for q in questions]
    first = {}  # each missing key's first question (a question repeated in the files is answered once)
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    todo = [i for k, i in first.items() if k not in cache]
    if todo:
        got = measure(model, processor, [prompts[i] for i in todo], None, None, batch_size=a.batch_size)["answers"]
        cache.update({keys[i]: ans for i, ans in zip(todo, got)})
        if a.answers_cache:
            Path(a.answers_cache).write_text(json.dumps(cache))
    unpruned = [cache[k] for k in keys]
    names = list(dict.fromkeys(sources))
    out = {"sources": {n: sources.count(n) for n in names}, "configs": {}, "differences": {}}
    agree = {}
    for name, cfg in configs.items():
        m = measure(model, processor, prompts, cfg, unpruned, batch_size=a.batch_size, sources=sources)
        agree[name] = np.array([normalize_answer(x) == normalize_answer(y) for x, y in zip(m["answers"], unpruned)])
        rec = {"config": cfg.to_dict(), "agreement": m["agreement"], "flops_ratio": m["flops_ratio"],
               "pruned_rate": m["pruned_rate"], "by_source": m["by_source"]}
        for src in names:
            rows = [i for i, s in enumerate(sources) if s == src]
            rec["by_source"][src]["agreement_ci95"] = bootstrap(agree[name][rows])
            rec["by_source"][src].update(by_correctness(questions, rows, unpruned, m["answers"]))
        out["configs"][name] = rec
        for src, r in rec["by_source"].items():
            print(f"{name:<14}{src:<10} n={r['examples']:<4} agreement {r['agreement']:.3f} "
                  f"[{r['agreement_ci95'][0]:.3f}, {r['agreement_ci95'][1]:.3f}]  FLOPs {r['flops_ratio']:.3f}  "
                  f"pruned {r['pruned_rate'] if r['pruned_rate'] is not None else float('nan'):.0%}"
                  + (f"  agreement where unpruned right {r['unpruned_right']['agreement']:.3f} (n={r['unpruned_right']['examples']}),"
                     f" wrong {r['unpruned_wrong']['agreement'] if r['unpruned_wrong']['examples'] else float('nan'):.3f}"
                     f" (n={r['unpruned_wrong']['examples']}); right->wrong {r['right_to_wrong']},"
                     f" wrong->right {r['wrong_to_right']}" if "unpruned_right" in r else ""), flush=True)
    listed = list(configs)
    for i, x in enumerate(listed):
        for y in listed[i + 1:]:
            d = {}
            for src in names:
                rows = [k for k, s in enumerate(sources) if s == src]
                diff = agree[x][rows].astype(float) - agree[y][rows].astype(float)
                d[src] = {"difference": float(diff.mean()), "ci95": bootstrap(diff)}
            out["differences"][f"{x} - {y}"] = d
            print(f"{x} - {y}: " + ", ".join(f"{s} {v['difference']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
                                             for s, v in d.items()))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
