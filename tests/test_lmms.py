"""The lmms-eval plugin on the embedded model: the CLI as a user types it, one and two processes.

Needs the lmms-eval extra (`bash scripts/setup.sh --lmms`, which CI runs); without it the module
skips, except under CI (``CI`` set), where a missing extra is a failure.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

try:
    import lmms_eval  # noqa: F401
except ImportError as e:
    if os.environ.get("CI"):
        raise RuntimeError("CI must install the lmms-eval extra (bash scripts/setup.sh --lmms)") from e
    pytest.skip("lmms-eval is not installed (bash scripts/setup.sh --lmms installs it)", allow_module_level=True)

from lmms_eval.api.instance import Instance  # noqa: E402

from visipruner.lmms import tasks_dir  # noqa: E402
from visipruner.lmms.model import STATS_FILE, VisiPrunerLMM, method_config  # noqa: E402
from visipruner.lmms.scenes_task import ensure_data  # noqa: E402

LIMIT = 8
ROOT = Path(__file__).resolve().parents[1]
TASK = "visipruner_scenes"


def _lmms_eval(out: Path, method: str, processes: int = 1, batch_size: int = 1) -> Path:
    """Run the stock CLI (as the README gives it); returns the output folder."""
    model_args = f"method={method}" + (f",batch_size={batch_size}" if batch_size != 1 else "")
    args = ["-m", "lmms_eval", "--model", "visipruner", "--model_args", model_args, "--tasks", TASK,
            "--include_path", str(tasks_dir()), "--limit", str(LIMIT), "--output_path", str(out), "--log_samples"]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
        assert accelerate, "accelerate's launcher is not installed beside this python"
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes),
               "--main_process_port", "29517", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    if not glob.glob(str(out / "**" / "*_results.json"), recursive=True):
        # lmms-eval logs some errors (an import that fails, a task that cannot load) and still
        # exits 0: show its own error lines, not only a missing file.
        log = p.stdout + p.stderr
        errors = [ln for ln in log.splitlines() if re.search(r"error|exception|traceback", ln, re.I)]
        pytest.fail(f"{' '.join(cmd)} exited 0 but wrote no results file; lmms-eval said:\n"
                    + "\n".join(errors[-20:] or log.splitlines()[-40:]))
    return out


def _results(out: Path) -> dict:
    files = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert len(files) == 1, files
    return json.loads(Path(files[0]).read_text())


def _samples(out: Path) -> dict[int, dict]:
    files = glob.glob(str(out / "**" / f"*_samples_{TASK}.jsonl"), recursive=True)
    assert len(files) == 1, files
    rows = [json.loads(line) for line in Path(files[0]).read_text().splitlines() if line.strip()]
    return {r["doc_id"]: r for r in rows}


def _answer(row: dict) -> str:
    r = row["filtered_resps"]
    return r if isinstance(r, str) else r[0]


def _stats(out: Path) -> dict:
    return json.loads((out / STATS_FILE).read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("lmms")
    # folders not named like a package: `python -m` puts the working folder first on sys.path
    return {m: _lmms_eval(base / f"out-{m}", m) for m in ("unpruned", "visipruner")}


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = VisiPrunerLMM(method="unpruned", device="cpu")
    yield model
    model.clean()


def test_cli_writes_results_and_stats(runs):
    for method, out in runs.items():
        res = _results(out)["results"][TASK]
        stats = _stats(out)
        assert 0.0 <= res["exact_match,none"] <= 1.0
        assert stats["method"] == method and stats["num_prompts"] == LIMIT and len(stats["samples"]) == LIMIT
        assert stats["mean_prefill_ms"] > 0 and stats["prefill_ms_prompts"] == LIMIT
        samples = _samples(out)
        assert len(samples) == LIMIT
        # per-sample statistics in lmms-eval's own sample log, agreeing with the stats file
        by_doc = {s["doc_id"]: s for s in stats["samples"]}
        for doc_id, row in samples.items():
            assert row["prefill_flops_ratio"] == pytest.approx(by_doc[doc_id]["prefill_flops_ratio"])
        assert res["prefill_flops_ratio,none"] == pytest.approx(stats["mean_prefill_flops_ratio"])
    unpruned, pruned = _stats(runs["unpruned"]), _stats(runs["visipruner"])
    assert unpruned["config"] is None and unpruned["mean_prefill_flops_ratio"] == 1.0
    assert unpruned["mean_visual_tokens_per_layer"] == 144.0
    assert pruned["config"]["method"] == "visipruner"
    assert pruned["mean_prefill_flops_ratio"] < 1.0
    assert pruned["mean_visual_tokens_per_layer"] < 144.0
    assert len(pruned["mean_visual_tokens_by_layer"]) == 30


def test_unpruned_scores_as_visipruner_eval(runs, lm):
    """Same questions, same answers and score as `visipruner eval` (its core, evaluate())."""
    from visipruner.data.questions import load_questions
    from visipruner.evaluate import evaluate

    questions = load_questions(ensure_data())[:LIMIT]
    ref = evaluate(lm.model, lm.processor, questions, batch_size=1, progress=False)
    samples = _samples(runs["unpruned"])
    assert [(samples[i]["input"], samples[i]["target"]) for i in range(LIMIT)] == [(q.question, q.answer) for q in questions]
    assert [_answer(samples[i]) for i in range(LIMIT)] == [r["prediction"] for r in ref["predictions"]]
    assert _results(runs["unpruned"])["results"][TASK]["exact_match,none"] == pytest.approx(ref["overall"]["accuracy"])


def _request(lm, doc, reqtype, args, doc_id=0):
    lm.task_dict = {"t": {"test": [doc]}}
    return Instance(request_type=reqtype, arguments=args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_loglikelihood_two_choices_equal_direct_logprobs(lm):
    from visipruner.data.questions import load_questions
    from visipruner.lmms.scenes_task import doc_to_visual

    q = load_questions(ensure_data())[0]
    doc = {"image": q.image, "question": q.question, "answer": q.answer, "id": q.id}
    choices = [q.answer, "purple" if q.answer != "purple" else "orange"]
    reqs = [_request(lm, doc, "loglikelihood", (q.question, c, doc_to_visual, 0, "t", "test")) for c in choices]
    got = lm.loglikelihood(reqs)

    inputs = lm._encode(doc_to_visual(doc), q.question)
    n = inputs["input_ids"].shape[1]
    for (logp, greedy), choice in zip(got, choices):
        cont = lm.tokenizer(choice, add_special_tokens=False)["input_ids"]
        full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], torch.tensor([cont])], 1),
                "attention_mask": torch.ones(1, n + len(cont), dtype=torch.long)}
        with torch.no_grad():
            logits = lm.model(**full).logits[0].float()
        lp = torch.log_softmax(logits[n - 1:-1], -1)
        direct = lp[torch.arange(len(cont)), torch.tensor(cont)].sum().item()
        assert logp == pytest.approx(direct, abs=1e-4)
        assert greedy == bool((lp.argmax(-1) == torch.tensor(cont)).all())
    assert got[0][0] > got[1][0]  # the model prefers the right colour


def test_multi_round_feeds_previous_answers(lm):
    from visipruner.data.questions import load_questions
    from visipruner.lmms.scenes_task import doc_to_visual

    q = load_questions(ensure_data())[1]
    doc = {"image": q.image, "question": q.question, "answer": q.answer, "id": "multi-round"}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((list(previous_output), round_idx, previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return doc_to_visual(doc), doc["question"], False, previous_output, {"round": round_idx}

    gen = {"max_new_tokens": 4}
    req = _request(lm, doc, "generate_until_multi_round", (q.question, gen, doc_to_visual, doc_to_text, 0, "t", "test"))
    (rounds,) = lm.generate_until_multi_round([req])
    (single,) = lm.generate_until([_request(lm, doc, "generate_until", (q.question, gen, doc_to_visual, 0, "t", "test"))])
    assert rounds == [single, single]
    assert seen == [([single], 1, None), ([single, single], 2, {"round": 1})]


def test_method_args(lm):
    from visipruner import FastVConfig, recommended_config

    assert method_config(lm.model, "unpruned", None) is None
    assert method_config(lm.model, "fastv", None) == FastVConfig()
    assert method_config(lm.model, None, None) == recommended_config(lm.model)
    with pytest.raises(ValueError, match="unknown method"):
        method_config(lm.model, "fastvv", None)
    with pytest.raises(ValueError, match="no such file"):
        method_config(lm.model, None, "/nonexistent/cfg.json")
    with pytest.raises(ValueError, match="unknown model_args"):
        VisiPrunerLMM.create_from_arg_string("method=unpruned,prune=yes")


def test_config_file(lm, tmp_path):
    """config=CFG.json is applied as saved."""
    from visipruner import FastVConfig

    cfg = tmp_path / "cfg.json"
    cfg.write_text(FastVConfig(layer=3, keep_ratio=0.25).to_json())
    assert method_config(lm.model, None, str(cfg)) == FastVConfig(layer=3, keep_ratio=0.25)
    with pytest.raises(ValueError, match="holds a 'fastv' config"):
        method_config(lm.model, "visipruner", str(cfg))


def _batch_requests(lm, n: int = 5) -> list[Instance]:
    """generate_until requests on scene questions: two generation settings interleaved (3 and 2
    requests) and one prompt without an image, so batches mix prompt lengths and are padded."""
    from visipruner.data.questions import load_questions
    from visipruner.lmms.scenes_task import doc_to_visual

    qs = load_questions(ensure_data())[:n]
    docs = [{"image": q.image, "question": q.question, "answer": q.answer, "id": f"batch-{i}", "text_only": i == 3}
            for i, q in enumerate(qs)]
    lm.task_dict = {"t": {"test": docs}}

    def visual(doc):
        return [] if doc["text_only"] else doc_to_visual(doc)

    gens = ({"max_new_tokens": 6}, {"max_new_tokens": 3, "until": ["e"]})
    return [Instance(request_type="generate_until", arguments=(d["question"], dict(gens[i % 2]), visual, i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]


def _answer_at(lm, requests, batch_size: int) -> tuple[list[str], list[dict]]:
    """generate_until's answers at this batch size and the records it made, in the order made."""
    lm.batch_size_per_process, start = batch_size, len(lm.records)
    try:
        answers = lm.generate_until(requests)
    finally:
        lm.batch_size_per_process = 1
    return answers, lm.records[start:]


def _per_request(records: list[dict]) -> dict[int, dict]:
    """Each request's statistics, without the timings and batch sizes (which depend on the batching)."""
    return {r["doc_id"]: {k: v for k, v in r.items() if k not in ("prefill_ms", "batch_prefill_ms", "batch_rows")}
            for r in records}


@contextmanager
def _applied(lm, method: str):
    """The plugin's model with ``method`` applied as ``method=...`` applies it (none for unpruned)."""
    from visipruner.runtime import apply

    cfg = method_config(lm.model, method, None)
    lm.method_config, lm.method = cfg, method
    lm.handle = apply(lm.model, cfg) if cfg is not None else None
    try:
        yield
    finally:
        if lm.handle is not None:
            lm.handle.remove()
        lm.method_config, lm.method, lm.handle, lm.batch_refusal = None, "unpruned", None, None


@pytest.fixture(scope="module")
def unpruned_alone(lm):
    """The unpruned answers and records of _batch_requests at batch_size=1."""
    return _answer_at(lm, _batch_requests(lm), 1)


@pytest.mark.parametrize("method", ["unpruned", "visipruner", "fastv"])
def test_batched_requests_answer_as_one_at_a_time(lm, unpruned_alone, method):
    """batch_size=3: each request's answer and statistics equal batch_size=1's, in the requests' order."""
    reqs = _batch_requests(lm)
    with _applied(lm, method):
        one, one_recs = unpruned_alone if method == "unpruned" else _answer_at(lm, reqs, 1)
        three, three_recs = _answer_at(lm, reqs, 3)
        assert lm.batch_refusal is None  # these methods batch on LLaVA
        if method == "unpruned":  # the order: each request asked on its own
            assert one == [lm.generate_until([r])[0] for r in reqs]
    assert three == one
    assert _per_request(three_recs) == _per_request(one_recs)
    assert sorted(_per_request(three_recs)) == list(range(len(reqs)))
    # really batched: settings {0, 2, 4} in one call of 3, {1, 3} in one of 2; rows of different lengths
    assert {r["doc_id"]: r.get("batch_rows") for r in three_recs} == {0: 3, 2: 3, 4: 3, 1: 2, 3: 2}
    assert all(r["batch_prefill_ms"] > 0 and r["prefill_ms"] is None for r in three_recs)
    assert all(r["prefill_ms"] > 0 and "batch_rows" not in r for r in one_recs)
    assert len({r["prompt_tokens"] for r in three_recs}) > 1
    by_doc = _per_request(one_recs)
    assert by_doc[3]["visual_tokens"] == 0 and by_doc[3]["prefill_flops_ratio"] == 1.0
    if method != "unpruned":  # the method prunes every prompt with an image
        assert all(by_doc[i]["prefill_flops_ratio"] < 1.0 for i in (0, 1, 2, 4))


def test_batch_refused_by_the_runtime_falls_back_to_one_at_a_time(lm, unpruned_alone):
    """A ValueError from a batched generate (the runtime refusing a batch) is warned about once; every
    prompt is then answered alone, as at batch_size=1. VisionZip, then a refusal forced on this model."""
    from loguru import logger

    from visipruner.evaluate import collate_prompts

    reqs = _batch_requests(lm)
    logs: list[str] = []
    sink = logger.add(lambda m: logs.append(str(m)), level="WARNING")
    try:
        with _applied(lm, "visionzip"):
            # does the runtime refuse a VisionZip batch today? (asked directly, not by name)
            ins = [lm._encode(r.args[2](lm.task_dict["t"]["test"][r.args[3]]), r.args[0]) for r in reqs[:2]]
            try:
                lm.model.generate(**collate_prompts(ins, lm.tokenizer.pad_token_id or 0), max_new_tokens=1)
                refused = False
            except ValueError:
                refused = True
            one, one_recs = _answer_at(lm, reqs, 1)
            three, three_recs = _answer_at(lm, reqs, 3)
            assert (lm.batch_refusal is not None) == refused
        assert three == one and _per_request(three_recs) == _per_request(one_recs)
        assert len([m for m in logs if "cannot run a batch" in m]) == int(refused)

        logs.clear()
        one, one_recs = unpruned_alone
        generate = lm.model.generate

        def refusing(**inputs):
            if inputs["input_ids"].shape[0] > 1:
                raise ValueError("pruning a batch is not supported here")
            return generate(**inputs)

        lm.model.generate = refusing  # this instance only
        three, three_recs = _answer_at(lm, reqs, 3)
    finally:
        vars(lm.model).pop("generate", None)
        logger.remove(sink)
        lm.batch_refusal = None
    assert three == one and _per_request(three_recs) == _per_request(one_recs)
    assert all("batch_rows" not in r for r in three_recs)
    warned = [m for m in logs if "cannot run a batch" in m]
    assert len(warned) == 1 and "pruning a batch is not supported here" in warned[0]


def test_two_processes_answer_as_one(runs, tmp_path):
    """Two processes, each answering its share in batches of 2 (batch_size=2), as one process alone."""
    out = _lmms_eval(tmp_path / "two", "visipruner", processes=2, batch_size=2)
    one, two = _samples(runs["visipruner"]), _samples(out)
    assert sorted(two) == sorted(one) == list(range(LIMIT))
    assert [_answer(two[i]) for i in range(LIMIT)] == [_answer(one[i]) for i in range(LIMIT)]
    s1, s2 = _stats(runs["visipruner"]), _stats(out)
    assert s2["processes"] == 2 and s2["num_prompts"] == LIMIT
    assert s2["mean_prefill_flops_ratio"] == pytest.approx(s1["mean_prefill_flops_ratio"])
    ratio = {r["doc_id"]: r["prefill_flops_ratio"] for r in s1["samples"]}
    assert {r["doc_id"]: r["prefill_flops_ratio"] for r in s2["samples"]} == ratio
    assert all(r["batch_rows"] == 2 for r in s2["samples"])
    assert _results(out)["results"][TASK]["exact_match,none"] == _results(runs["visipruner"])["results"][TASK]["exact_match,none"]


def test_lmms_tasks_command_prints_the_task_folder(capsys):
    from visipruner.cli import main

    assert main(["lmms-tasks"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == tasks_dir() and (folder / TASK / f"{TASK}.yaml").is_file()
