"""Decode step time under torch.compile, pruned vs unpruned, measured in one run on the CPU.

The model is the narrow LLaVA of ``host_overhead.py`` (width 64: each operator's arithmetic is negligible,
the launch-bound regime of a GPU at batch 1, where compiling pays most). For each setting the same model
is compiled once (``torch.compile(model, backend=...)``), pruning applied or not; after a warm-up
generation (which compiles, and checks that compiled tokens equal eager tokens), decode steps are timed
in interleaved repeats, eager and compiled. Reported: median step time, and pruned / unpruned ratios.

    python benchmarks/compile_speed.py                     # inductor
    python benchmarks/compile_speed.py --backend aot_eager
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from host_overhead import apply, decode_step, narrow_llava, prefill, random_prompt, settings

NAMES = ("unpruned", "visipruner (forced schedule)", "fastv")


def steps_timed(model, inputs, steps: int) -> tuple[list[float], list[int]]:
    """Per-step times of ``steps`` decode steps after a fresh prefill, and the tokens."""
    cache, token = prefill(model, inputs)
    times, tokens = [], [int(token)]
    for _ in range(steps):
        t = time.perf_counter()
        token = decode_step(model, cache, token)
        times.append(time.perf_counter() - t)
        tokens.append(int(token))
    return times, tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch._dynamo.config.recompile_limit = 64  # one set of graphs per setting (and per cache length bucket)
    model = narrow_llava(args.layers)
    inputs = random_prompt(model, seed=0, prefix=6, suffix=16)
    table = settings(args.layers)
    compiled = torch.compile(model, backend=args.backend)
    times = {(n, mode): [] for n in NAMES for mode in ("eager", "compiled")}
    for r in range(args.repeats + 1):  # repeat 0 compiles (not timed)
        for n in NAMES:
            config, schedule = table[n]
            handle = apply(model, config, schedule)
            try:
                t_eager, tok_eager = steps_timed(model, inputs, args.steps)
                t = time.perf_counter()
                t_comp, tok_comp = steps_timed(compiled, inputs, args.steps)
                if r == 0:
                    print(f"{n}: compiled in {time.perf_counter() - t:.1f} s", file=sys.stderr)
                    if tok_comp != tok_eager:
                        raise SystemExit(f"{n}: compiled tokens {tok_comp} differ from eager {tok_eager}")
                else:
                    times[n, "eager"] += t_eager[1:]
                    times[n, "compiled"] += t_comp[1:]
            finally:
                if handle is not None:
                    handle.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.layers}-layer LLaVA, width 64, backend {args.backend}, {args.threads} thread(s); median decode step of "
          f"{args.repeats} x {args.steps - 1} steps")
    print(f"{'method':30s} {'eager ms':>9s} {'compiled ms':>11s} {'eager ratio':>11s} {'compiled ratio':>14s}")
    for n in NAMES:
        e, c = med[n, "eager"], med[n, "compiled"]
        print(f"{n:30s} {e * 1e3:9.2f} {c * 1e3:11.2f} {e / med['unpruned', 'eager']:11.3f} "
              f"{c / med['unpruned', 'compiled']:14.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{n} / {m}": v for (n, m), v in times.items()}, f, indent=1)


if __name__ == "__main__":
    main()
