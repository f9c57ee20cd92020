"""Host overhead of pruning in decode: host-device synchronisations, operator calls and step time,
pruned vs unpruned, on a LLaVA so narrow that compute is negligible.

At batch 1 on a GPU a decode step is launch-bound: the host queues a few hundred small kernels and
the device finishes each before the next arrives. What pruning adds to a step is then what it
costs: every extra operator is an extra launch, and every host-device synchronisation (``.item()``,
``.tolist()``, ``bool(tensor)``, ``nonzero``, boolean indexing) drains the launch queue. This script
builds that regime on the CPU (a 16-layer LLaVA of width 64, so each operator's arithmetic is
negligible next to its dispatch) and reports, for one decode step after a pruned prefill:

* ``syncs``: host reads of tensor values, counted with the profiler (``aten::_local_scalar_dense``,
  the op behind ``.item()``/``int()``/``bool()``, plus ``aten::nonzero`` and ``aten::equal``) and a
  torch-function mode (``.tolist()``/``.numpy()``, which read CPU memory without an operator);
* ``ops``: every ``aten::`` operator call the profiler records (nested calls included), and its
  ratio to the unpruned step;
* ``step``: median wall time of a decode step, pruned / unpruned, measured in one run (interleaved).

The same counts for the prefill show where a pruned prefill reads values: at the layers where a
method takes a decision. Targets (issue 20): decode syncs <= the unpruned step's, decode ops <= 1.2x,
step time <= 1.1x.

    python benchmarks/host_overhead.py                  # every method, table
    python benchmarks/host_overhead.py --json out.json  # and every raw number
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache

import visipruner
from visipruner import Schedule, VisiPrunerConfig
from visipruner.methods import (
    DARTConfig, FastVConfig, PDropConfig, RandomConfig, SparseVLMConfig, VisionZipConfig, VTWConfig,
)
from visipruner.testing import random_prompt, tiny_llava

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal")
HOST_READS = ("tolist", "numpy")  # read a CPU tensor's memory without an operator the profiler sees


def narrow_llava(layers: int = 16):
    """A LLaVA whose every operator is launch-bound: width 64, 64 visual tokens per image."""
    return tiny_llava(0, layers=layers, hidden=64, heads=4, kv_heads=2, intermediate=128, image_size=64, patch=8)


def settings(layers: int, visual: int = 64) -> dict:
    """name -> (config, schedule) for every method; VisiPruner's schedule is forced (the 32-layer paper
    setting, shallow 6 / fusion 10 / exit 20, scaled to ``layers``; every 4th of ``visual`` tokens
    critical), so its step has every stage."""
    K = max(1, round(6 * layers / 32))
    fusion, exit_ = max(K + 1, round(10 * layers / 32)), max(K + 2, round(20 * layers / 32))
    return {
        "unpruned": (None, None),
        "visipruner (forced schedule)": (VisiPrunerConfig(shallow_layers=K), Schedule(fusion, list(range(0, visual, 4)), exit_)),
        "fastv": (FastVConfig(), None),
        "pdrop": (PDropConfig(), None),
        "vtw": (VTWConfig(), None),
        "random": (RandomConfig(), None),
        "dart": (DARTConfig(), None),
        "sparsevlm": (SparseVLMConfig(), None),
        "visionzip": (VisionZipConfig(), None),
    }


class _HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@dataclass
class Counts:
    syncs: int  # host reads of tensor values
    ops: int  # aten operator calls
    sync_ops: dict  # which ops synchronised, how often

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def count(fn) -> Counts:
    """Syncs and operator calls of ``fn()`` (deterministic: no timing involved)."""
    reads = _HostReads()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, reads:
        fn()
    names = Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    sync_ops = {k: names[k] for k in SYNC_OPS if names[k]}
    if reads.count:
        sync_ops["tolist/numpy"] = reads.count
    return Counts(sum(sync_ops.values()), sum(names.values()), sync_ops)


def prefill(model, inputs):
    """The prompt's prefill into a fresh cache; returns (cache, next token)."""
    cache = DynamicCache(config=model.config.text_config)
    out = model(**inputs, past_key_values=cache, use_cache=True)
    return cache, out.logits[:, -1:].argmax(-1)


def decode_step(model, cache, token):
    return model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)


def apply(model, config, schedule):
    """``visipruner.apply`` for a row of ``settings``; None for the unpruned row."""
    if config is None:
        return None
    return visipruner.apply(model, config, schedule=schedule) if schedule else visipruner.apply(model, config)


def measure(model, inputs, config, schedule):
    """Counts of a pruned prefill and of its first decode step, and the layers where the method decided.
    ``config`` None: unpruned."""
    handle = apply(model, config, schedule)
    try:
        box = {}
        pre = count(lambda: box.update(zip(("cache", "token"), prefill(model, inputs))))
        step = count(lambda: decode_step(model, box["cache"], box["token"]))
        return pre, step, _decisions(handle)
    finally:
        if handle is not None:
            handle.remove()


def paired_step_times(unpruned, pruned, inputs, steps: int) -> tuple[list[float], list[float]]:
    """Decode step times of two models (the same weights, one with a method applied), step by step in
    alternation after each one's prefill, so that both see the same machine load."""
    state = [list(prefill(m, inputs)) for m in (unpruned, pruned)]
    times = ([], [])
    for _ in range(steps):
        for i, m in enumerate((unpruned, pruned)):
            t = time.perf_counter()
            state[i][1] = decode_step(m, *state[i])
            times[i].append(time.perf_counter() - t)
    return times[0][1:], times[1][1:]  # the first step after a prefill is not the steady state


def _decisions(handle) -> int:
    """Layers after which the prefill dropped tokens."""
    if handle is None:
        return 0
    st = handle.last_stats
    return sum(a != b for a, b in zip(st.tokens_per_layer, st.tokens_per_layer[1:]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per repeat")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median taken)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=str, default=None)
    p.add_argument("--settings", nargs="+", default=None, metavar="NAME")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = narrow_llava(args.layers)
    inputs = random_prompt(model, seed=0, prefix=6, suffix=16)
    table = settings(args.layers)
    names = [n for n in table if args.settings is None or n in args.settings or n == "unpruned"]
    twin = copy.deepcopy(model)  # the unpruned model, paired step by step with each pruned one
    results = {}
    for n in names:
        pre, step, decisions = measure(model, inputs, *table[n])
        results[n] = dict(prefill=pre.to_dict(), decode=step.to_dict(), decisions=decisions, ratios=[])  # drop layers
        if n == "unpruned":
            continue
        handle = apply(model, *table[n])
        try:
            for _ in range(args.repeats):
                base_t, pruned_t = paired_step_times(twin, model, inputs, args.steps)
                results[n]["ratios"].append(statistics.median(pruned_t) / statistics.median(base_t))
                results[n].setdefault("unpruned_ms", []).append(statistics.median(base_t) * 1e3)
        finally:
            handle.remove()
        print(f"{n} done", file=sys.stderr)
    base = results["unpruned"]
    print(f"{args.layers}-layer LLaVA, width 64, {inputs['input_ids'].shape[1]} prompt tokens; one decode step after "
          f"the prefill; {args.threads} thread(s); step ratio: median over {args.repeats} runs of the median of "
          f"{args.steps - 1} paired steps")
    print(f"{'method':30s} {'decode syncs':>12s} {'decode ops':>10s} {'ops ratio':>9s} {'step ratio':>10s} "
          f"{'prefill syncs':>13s} {'decisions':>9s}")
    for n in names:
        r = results[n]
        r["ops_ratio"] = r["decode"]["ops"] / base["decode"]["ops"]
        r["step_ratio"] = statistics.median(r["ratios"]) if r["ratios"] else 1.0
        print(f"{n:30s} {r['decode']['syncs']:12d} {r['decode']['ops']:10d} {r['ops_ratio']:9.3f} "
              f"{r['step_ratio']:10.3f} {r['prefill']['syncs']:13d} {r['decisions']:9d}")
    steps_ms = [t for r in results.values() for t in r.get("unpruned_ms", [])]
    print(f"unpruned step: {statistics.median(steps_ms):.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
