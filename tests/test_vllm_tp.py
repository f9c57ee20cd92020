"""The vLLM plugin under tensor parallelism (TP=2: two worker processes on vLLM's CPU backend).

Each rank holds half the query and KV heads; the influence's per-head sums are all-reduced over
vLLM's TP group, so both ranks take the whole model's decision. Checked on the tiny LLaVA of
``test_vllm`` (4 query heads, 2 KV heads: both divide by 2): TP=2 against TP=1 for the model served
unpruned (which sets the log-prob tolerance TP itself introduces: its row-parallel layers sum in a
different order), then for pruning that fires (FastV, from the heads' mean attention; VisiPruner with
measured thresholds, from cos and norms): the same tokens, log-probs within that tolerance, and on
each rank of TP=2 a record with the same kept tokens per layer as TP=1's.

Each TP size runs in its own subprocess (``serve``; the two side by side), whose engine serves the three
settings one after the other; records come from each rank's own process (``LLM.apply_model`` runs on
every worker).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import test_vllm as t  # the tiny model, its requests and the engine settings (skips without vLLM)
from visipruner import FastVConfig
from visipruner.vllm.folders import save_for_vllm

REQUESTS = [0, 1, 2, 4]  # one image, text only, two images, one image
SMALL = dict(max_num_batched_tokens=512, max_num_seqs=8)  # a shorter profiling run at engine start
FASTV = FastVConfig(layer=1, keep_ratio=0.25)


def _rank_state(model):
    """On one rank: its pruner's records and all-reduce count (None: the model serves unpruned)."""
    from visipruner.vllm.records import RECENT

    p = model.visipruner
    return None if p is None else {"records": list(RECENT), "reductions": p.reductions}


def _serve_visipruner(model):
    """On one rank: from now on the engine's pruner serves ``test_vllm.MEASURED`` (an engine start costs
    half a minute at TP=2, so one engine serves the three settings: its folder's FastV, this, unpruned)."""
    from visipruner.vllm.settings import ServeSettings

    model.visipruner.settings = ServeSettings(t.MEASURED)
    model.visipruner.on_prefill.method = t.MEASURED.method
    model.visipruner.reductions = 0


def _serve_unpruned(model):
    model.visipruner = None  # vLLM's own forward, as for a folder without a pruning config


def serve(tp: int, path: str, out: str) -> None:
    """The FastV folder served with ``tensor_parallel_size=tp``, then VisiPruner, then unpruned; writes the
    answers and each rank's state (``apply_model`` runs on every worker) after each."""
    from vllm import LLM

    requests = [t.REQUESTS[i] for i in REQUESTS]
    start = time.perf_counter()
    llm = LLM(model=path, tensor_parallel_size=tp, **{**t.ENGINE, **SMALL})
    print(f"TP={tp}: engine up in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    result = {}
    for name, switch in (("fastv", None), ("visipruner", _serve_visipruner), ("unpruned", _serve_unpruned)):
        if switch is not None:
            llm.apply_model(switch)
        outs = llm.generate([r.vllm_prompt() for r in requests], [t._params(r.max_tokens) for r in requests],
                            use_tqdm=False)
        result[name] = {"answers": [t._answer(o) for o in outs],
                        "prompts": [list(o.prompt_token_ids) for o in outs],
                        "ranks": llm.apply_model(_rank_state)}
    print(f"TP={tp}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    with open(out, "w") as f:
        json.dump(result, f)


def serve_bounded(path: str, out: str) -> None:
    """The folder with ``exit_by`` and a fusion budget served with TP=2 and the plugin's scheduler: the
    answers, and the KV-cache spec of each layer from vLLM's own KV-cache config."""
    from vllm import LLM

    from visipruner.vllm.kv_memory import SCHEDULER

    requests = [t.REQUESTS[i] for i in REQUESTS]
    llm = LLM(model=path, tensor_parallel_size=2, scheduler_cls=SCHEDULER, **{**t.ENGINE, **SMALL})
    groups = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config.kv_cache_groups
    specs = {int(name.split(".")[-3]): type(g.kv_cache_spec).__name__ for g in groups for name in g.layer_names}
    outs = llm.generate([r.vllm_prompt() for r in requests], [t._params(r.max_tokens) for r in requests],
                        use_tqdm=False)
    with open(out, "w") as f:
        json.dump({"answers": [t._answer(o) for o in outs], "specs": [specs[i] for i in sorted(specs)]}, f)


def _start(tp: int, call: str) -> subprocess.Popen:
    """A process that runs ``call`` (e.g. ``serve(2, ...)``) of this module with vLLM's settings for ``tp``."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if tp > 1:  # vLLM's own setting: one core per worker (it refuses TP>1 on one NUMA node without it)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_vllm_tp as m; m.{call}"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _max_diff(a, b) -> float:
    return max(abs(x - y) for (_, la), (_, lb) in zip(a, b) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if len(os.sched_getaffinity(0)) < 2:  # vLLM's CPU backend binds each TP worker to its own core
        pytest.skip("TP=2 on vLLM's CPU backend needs 2 cores")
    model, proc = t.tiny_model()
    text = model.config.text_config
    assert text.num_attention_heads % 2 == 0 and text.num_key_value_heads % 2 == 0
    root = tmp_path_factory.mktemp("tp")
    folders = {tp: save_for_vllm(model, proc, root / f"fastv{tp}", config=FASTV, record=root / f"tp{tp}.jsonl")
               for tp in (2, 1)}  # one record file per TP size
    procs = {tp: _start(tp, f"serve({tp}, {str(path)!r}, {str(root / f'tp{tp}.json')!r})")
             for tp, path in folders.items()}  # side by side
    for tp, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        print("\n".join(line for line in err.splitlines() if line.startswith("TP=")))
    return {tp: {**json.loads((root / f"tp{tp}.json").read_text()),
                 "jsonl": [json.loads(line) for line in (root / f"tp{tp}.jsonl").read_text().splitlines()]}
            for tp in (1, 2)}


def test_tp2_takes_tp1_decisions_on_both_ranks(runs):
    one, two = runs[1], runs[2]
    stock_diff = _max_diff(one["unpruned"]["answers"], two["unpruned"]["answers"])
    assert [a for a, _ in one["unpruned"]["answers"]] == [a for a, _ in two["unpruned"]["answers"]]
    assert two["unpruned"]["ranks"] == [None, None]  # served unpruned: vLLM's own forward
    tol = max(4 * stock_diff, 1e-5)  # what TP itself changes, with a floor for a stock diff of ~0
    image_prompts = [p for p, i in zip(one["unpruned"]["prompts"], REQUESTS) if t.REQUESTS[i].images]
    # the record file gets each pruned request once (from TP rank 0): FastV's, then VisiPruner's
    assert [(r["method"], r["prompt_fingerprint"]) for r in two["jsonl"]] == \
        [(r["method"], r["prompt_fingerprint"]) for r in one["jsonl"]]
    assert len(two["jsonl"]) == 2 * len(image_prompts)
    print(f"log-prob |TP=2 - TP=1|: unpruned {stock_diff:.2e}, " + ", ".join(
        f"{name} {_max_diff(one[name]['answers'], two[name]['answers']):.2e}" for name in ("fastv", "visipruner")))
    for name in ("fastv", "visipruner"):
        a, b = one[name], two[name]
        assert [x for x, _ in a["answers"]] == [x for x, _ in b["answers"]], name
        assert _max_diff(a["answers"], b["answers"]) <= tol, (name, stock_diff)
        assert len(b["ranks"]) == 2
        (ref,) = a["ranks"]
        assert ref["reductions"] == 0  # TP=1: nothing to sum across processes
        by_prompt = {r["prompt_fingerprint"]: r for r in ref["records"] if r["method"] == name}
        assert len(by_prompt) == len(image_prompts)
        for rank in b["ranks"]:
            assert rank["reductions"] > 0  # the influence was summed across ranks
            records = {r["prompt_fingerprint"]: r for r in rank["records"] if r["method"] == name}
            assert records.keys() == by_prompt.keys()
            # pruning happened on this rank: FastV for every image request, VisiPruner for some
            pruned = [rec["visual_tokens_per_layer"][-1] < rec["visual_tokens"] for rec in records.values()]
            assert all(pruned) if name == "fastv" else any(pruned), (name, pruned)
            for fp, rec in records.items():
                for key in ("kept_fingerprint", "visual_tokens_per_layer", "fusion_layer", "exit_layer",
                            "critical_token_ids"):
                    assert rec[key] == by_prompt[fp][key], (name, key)
        if name == "visipruner":  # the measured thresholds fired: a fusion layer with a strict subset, an exit
            recs = list(by_prompt.values())
            assert any(r["fusion_layer"] is not None and 0 < r["critical_tokens"] < r["visual_tokens"] for r in recs)
            assert any(r["exit_layer"] is not None for r in recs)


def test_tp2_with_the_kv_bound_answers_as_the_hf_runtime(tmp_path):
    """Tensor parallelism and the KV bound together (``exit_by`` with a fusion budget: layers after the
    bounds in KV-cache groups of their own on both ranks): every request answers as ``visipruner.apply``
    on the HF model (tokens, log-probs within 1e-4)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("TP=2 on vLLM's CPU backend needs 2 cores")
    tiny = t.tiny_model()
    path = save_for_vllm(*tiny, tmp_path / "bounded", config=t.BOUNDED)
    p = _start(2, f"serve_bounded({str(path)!r}, {str(tmp_path / 'bounded.json')!r})")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
    run = json.loads((tmp_path / "bounded.json").read_text())
    assert run["specs"] == ["FullAttentionSpec"] * 3 + ["BoundedAttentionSpec"] * 3
    for i, (tokens, logprobs) in zip(REQUESTS, run["answers"]):
        hf_tokens, hf_logprobs, _, _ = t._hf(tiny, t.REQUESTS[i], t.BOUNDED)
        assert tokens == hf_tokens, i
        assert max(abs(a - b) for a, b in zip(logprobs, hf_logprobs)) < 1e-4
