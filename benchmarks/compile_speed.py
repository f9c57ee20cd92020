"""Decode step time under torch.compile, pruned vs unpruned, measured in one run on the CPU.

The model is the narrow LLaVA of ``host_overhead.py`` (width 64: each operator's arithmetic is negligible,
the launch-bound regime of a GPU at batch 1, where compiling pays most). For each setting the same model
and an unpruned copy are compiled once each (``torch.compile(model, backend=...)``); after a warm-up
generation per setting (which compiles, and checks that compiled tokens equal eager tokens), decode steps
of the pruned and the unpruned model alternate step by step (same machine load), compiled and eager.
Reported: median step times and pruned / unpruned ratios.

    python benchmarks/compile_speed.py                     # inductor
    python benchmarks/compile_speed.py --backend aot_eager
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from host_overhead import apply, decode_step, narrow_llava, paired_step_times, prefill, random_prompt, settings

NAMES = ("visipruner (forced schedule)", "fastv")


def greedy_tokens(model, inputs, steps: int) -> list[int]:
    cache, token = prefill(model, inputs)
    tokens = [int(token)]
    for _ in range(steps):
        token = decode_step(model, cache, token)
        tokens.append(int(token))
    return tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    p.add_argument("--repeats", type=int, default=3, help="paired runs per setting (median taken)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    # transformers' layers compile one graph per layer index and cache regime, for both models (they share code
    # objects): past the default limit (8) dynamo would fall back to eager and the ratio would compare fallbacks
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 8192
    model = narrow_llava(args.layers)
    twin = copy.deepcopy(model)  # stays unpruned
    inputs = random_prompt(model, seed=0, prefix=6, suffix=16)
    table = settings(args.layers)
    compiled, compiled_twin = torch.compile(model, backend=args.backend), torch.compile(twin, backend=args.backend)
    t = time.perf_counter()
    greedy_tokens(compiled_twin, inputs, args.steps)
    print(f"unpruned: compiled in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    results = {}
    for n in NAMES:
        handle = apply(model, *table[n])
        try:
            eager = greedy_tokens(model, inputs, args.steps)
            t = time.perf_counter()
            if greedy_tokens(compiled, inputs, args.steps) != eager:  # also compiles every graph it needs
                raise SystemExit(f"{n}: compiled tokens differ from eager")
            print(f"{n}: compiled in {time.perf_counter() - t:.1f} s, tokens equal to eager", file=sys.stderr)
            r = results[n] = {"eager": [], "compiled": [], "compiled_ms": [], "unpruned_compiled_ms": []}
            for _ in range(args.repeats):
                base_t, pruned_t = paired_step_times(twin, model, inputs, args.steps)
                r["eager"].append(statistics.median(pruned_t) / statistics.median(base_t))
                base_t, pruned_t = paired_step_times(compiled_twin, compiled, inputs, args.steps)
                r["compiled"].append(statistics.median(pruned_t) / statistics.median(base_t))
                r["compiled_ms"].append(statistics.median(pruned_t) * 1e3)
                r["unpruned_compiled_ms"].append(statistics.median(base_t) * 1e3)
        finally:
            handle.remove()
    print(f"{args.layers}-layer LLaVA, width 64, backend {args.backend}, {args.threads} thread(s); decode step time "
          f"pruned / unpruned: median over {args.repeats} runs of the median of {args.steps - 1} paired steps")
    print(f"{'method':30s} {'compiled ms':>11s} {'unpruned compiled ms':>20s} {'compiled ratio':>14s} {'eager ratio':>11s}")
    for n, r in results.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        print(f"{n:30s} {med['compiled_ms']:11.2f} {med['unpruned_compiled_ms']:20.2f} {med['compiled']:14.3f} "
              f"{med['eager']:11.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
