"""transformers' own model and generation tests, run against applied models (../shared/hf-suite).

Its focused selection (generation, forward, cache, batching, equivalence) runs three times through
its run.sh: ``baseline`` (plain transformers), ``disabled`` (every model applied with every stage off)
and ``pruning`` (applied with a forced schedule that really prunes the testers' 2-layer models).
``disabled`` must pass everything the baseline passes; under ``pruning`` no test may crash through
visipruner, and visipruner may refuse only where README ("Refusals") documents a limit. What remains
(shapes of logits, caches, attention maps that have fewer tokens) is the documented consequence of
removing tokens. Skipped where ../shared/hf-suite is absent (a user's clone). About 85 s on 2 cores (the three runs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT.parent / "shared" / "hf-suite"
PYTHON = ROOT / ".venv" / "bin" / "python"

pytestmark = [
    pytest.mark.skipif(not (SUITE / "run.sh").is_file(),
                       reason="../shared/hf-suite (transformers' own tests) is not beside this clone"),
    pytest.mark.skipif(not PYTHON.is_file(), reason="hf-suite/run.sh needs the project's .venv (scripts/setup.sh)"),
]

# Each refusal transformers' tests may meet, with the README line that documents it ("Refusals").
DELIBERATE = {
    r"pruning a padded batch needs left padding": "right-padded batches (the testers' masks are not left-padded)",
    r"visipruner needs input_ids": "inputs_embeds only: the visual tokens cannot be found",
    r"pruning needs a dynamic KV cache": "static caches store every token at its position's slot",
    r"visual tokens arrive in a KV cache that already holds": "images in a later turn of a reused cache",
    r"image_sizes .* do not match the prompt's image tokens": "LLaVA-NeXT image tokens under padding",
    r"it was cropped into the pruned tokens": "assisted decoding of a prompt ending in a visual token",
}


def _run(mode: str) -> Path:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISIPRUNER_HF_")}
    env.update(OMP_NUM_THREADS="1", TEST_TIMEOUT="300")
    name = f"{mode}_ci"  # run.sh: the mode is the part before "_", results go to runs/hf-suite/<name>
    subprocess.run(["bash", str(SUITE / "run.sh"), name], cwd=ROOT, env=env, check=False, timeout=900,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = ROOT / "runs" / "hf-suite" / name
    assert (out / "junit.xml").is_file(), f"hf-suite {mode} wrote no results; see {out / 'log.txt'}"
    return out


def _outcomes(run: Path) -> dict[str, str]:
    out = {}
    for case in ET.parse(run / "junit.xml").iter("testcase"):
        tags = {child.tag for child in case}
        out[f"{case.get('classname')}::{case.get('name')}"] = (
            "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed")
    return out


def _records(run: Path, name: str) -> list[dict]:
    path = run / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


@pytest.fixture(scope="module")
def runs() -> dict[str, Path]:
    return {mode: _run(mode) for mode in ("baseline", "disabled", "pruning")}


def test_the_baseline_ran_the_selection(runs):
    passed = [k for k, v in _outcomes(runs["baseline"]).items() if v == "passed"]
    assert len(passed) > 150, f"only {len(passed)} baseline tests passed; see {runs['baseline'] / 'log.txt'}"


def test_disabled_pruning_changes_no_test_outcome(runs):
    base, disabled = _outcomes(runs["baseline"]), _outcomes(runs["disabled"])
    lost = sorted(k for k, v in base.items() if v == "passed" and disabled.get(k) != "passed")
    assert not lost, f"{len(lost)} tests pass on plain transformers but not with apply(stages=()): {lost}"


def test_pruning_really_prunes_the_testers_models(runs):
    records = _records(runs["pruning"], "tests.jsonl")
    pruned = [r["nodeid"] for r in records if r.get("pruned_prefills", 0) > 0]
    assert len(pruned) > 50, f"only {len(pruned)} tests had a prefill where tokens were removed"


def test_pruning_never_crashes_and_refuses_only_where_documented(runs):
    passed = {k for k, v in _outcomes(runs["baseline"]).items() if v == "passed"}
    failures = _records(runs["pruning"], "classify.jsonl")
    crashes = [f"{r['nodeid']}: {r['exc_type']}: {r['message']} ({r['last_visipruner_frame']})"
               for r in failures if r["category"] == "crash"]
    assert not crashes, "visipruner crashed (an exception through its code that is not its own raise):\n" + \
        "\n".join(crashes)
    undocumented = [f"{r['nodeid']}: {r['message']}" for r in failures if r["category"] == "refusal"
                    and not any(re.search(p, r["message"]) for p in DELIBERATE)]
    assert not undocumented, "refusals README does not document:\n" + "\n".join(undocumented)
    others = [f"{r['nodeid']}: {r['exc_type']}: {r['message']}" for r in failures if r["category"] == "other"
              and _junit_name(r["nodeid"]) in passed]
    assert not others, "errors outside visipruner after pruning (e.g. shapes the model cannot take):\n" + \
        "\n".join(others)


def _junit_name(nodeid: str) -> str:
    """pytest's node id (tests/models/x/test_y.py::Class::test) as junit names it (tests.models.x.test_y::...)."""
    path, _, rest = nodeid.partition("::")
    cls, _, test = rest.rpartition("::")
    return f"{path.removesuffix('.py').replace('/', '.')}.{cls}::{test}"
