"""Tensor parallelism under the vLLM plugin: the same model served with TP=1 and TP=2, measured in one run.

The model is ``vllm_throughput.py``'s LLaVA-1.5-shaped random model (576 visual tokens per image),
served stock (no pruning config: vLLM's own forward) and with VisiPruner's measured decisions
(``measured``: the influence check at every layer after K, so under TP one all-reduce of the
influence's 3m + 2 float64 sums per checked layer, m = visual tokens present). Per TP size and
setting: prefill alone (time to first token of one request with one answer token, median of
``--prefill-repeats``), the all-reduces in that prefill (count and seconds on TP rank 0, from the
plugin's counters; each call's time includes waiting for the slower rank, so it bounds the
communication cost from above) and their share of the prefill, and output tokens/s with
``--concurrency`` requests at once. Each TP size runs in its own process, one after the other (vLLM's
CPU backend binds each TP worker to one core: ``VLLM_CPU_OMP_THREADS_BIND``).

    python benchmarks/vllm_tp.py                          # CPU: vLLM's CPU backend, TP 1 and 2
    python benchmarks/vllm_tp.py --device cuda --tp 1 2 4
    python benchmarks/vllm_tp.py --json runs/vllm_tp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM's own switch: the engine core here

sys.path.insert(0, str(Path(__file__).parent))
from vllm_throughput import build_folders, model_arguments, requests_for, run_batch, write_json  # noqa: E402

SETTINGS = ["stock vLLM", "measured"]


def _counters(model):
    """On TP rank 0: the plugin's all-reduce counters and its last record's decisions."""
    from visipruner.vllm.records import RECENT

    p = model.visipruner
    last = {k: RECENT[-1][k] for k in ("fusion_layer", "exit_layer", "visual_tokens_per_layer")} if RECENT else None
    return None if p is None else (p.reductions, p.reduce_seconds, last)


def measure(tp: int, folders: dict, args) -> dict:
    """One TP size: each setting's prefill, all-reduce share and throughput (run in its own process)."""
    from vllm import LLM

    out = {}
    for name, path in folders.items():
        kw = dict(dtype=args.dtype, enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False,
                  max_model_len=1024, max_num_batched_tokens=1024 * 8, max_num_seqs=args.concurrency, seed=0,
                  tensor_parallel_size=tp)
        kw.update(dict(gpu_memory_utilization=0.1, kv_cache_memory_bytes=args.kv_cache_gib << 30)
                  if args.device == "cpu" else dict(gpu_memory_utilization=0.5))
        start = time.perf_counter()
        llm = LLM(model=path, **kw)
        print(f"TP={tp} {name}: engine up in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        run_batch(llm, requests_for(2, args, seed=99), 2)  # first-call costs out of the figures
        one = requests_for(1, args, seed=7)
        ttft, calls, seconds = [], [], []
        for _ in range(args.prefill_repeats):
            before = llm.apply_model(_counters)[0]
            ttft.append(run_batch(llm, one, 1)["ttft_s"])
            after = llm.apply_model(_counters)[0]
            if before is not None:
                calls.append(after[0] - before[0])
                seconds.append(after[1] - before[1])
        row = {"prefill_ttft_s": statistics.median(ttft)}
        if calls:
            row["allreduce_calls_per_prefill"] = statistics.median(calls)
            row["allreduce_s_per_prefill"] = statistics.median(seconds)
            row["allreduce_share_of_prefill"] = row["allreduce_s_per_prefill"] / row["prefill_ttft_s"]
            row["decisions"] = after[2]  # the same at every TP size (the README's table says so)
        batches = [run_batch(llm, requests_for(args.concurrency, args, seed=1000 + rep), args.max_tokens)
                   for rep in range(args.repeats)]
        row["output_tokens_per_s"] = statistics.median(b["output_tokens_per_s"] for b in batches)
        out[name] = row
        del llm
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor_parallel_size values to compare")
    model_arguments(p)
    p.add_argument("--concurrency", type=int, default=8, help="requests at once for output tokens/s")
    p.add_argument("--max-tokens", type=int, default=16, help="answer tokens per request (EOS ignored)")
    p.add_argument("--repeats", type=int, default=2, help="batches for output tokens/s")
    p.add_argument("--prefill-repeats", type=int, default=5)
    p.add_argument("--kv-cache-gib", type=int, default=2, help="CPU KV cache size")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one TP size, in its own process
    args = p.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.settings = SETTINGS
    if args.worker:
        job = json.loads(args.worker)
        Path(job["out"]).write_text(json.dumps(measure(job["tp"], job["folders"], args)))
        return
    bad = [tp for tp in args.tp if args.heads % tp or args.kv_heads % tp]
    if bad:
        p.error(f"--heads {args.heads} and --kv-heads {args.kv_heads} must divide by every --tp (not {bad})")

    results = {"args": vars(args), "tp": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: str(path) for name, (path, _) in build_folders(args, Path(tmp)).items()}
        for tp in args.tp:
            env = dict(os.environ)
            if args.device == "cpu" and tp > 1:  # vLLM's own setting: one core per TP worker
                env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))
            out = Path(tmp) / f"tp{tp}.json"
            job = json.dumps({"tp": tp, "folders": folders, "out": str(out)})
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", job], env=env, check=True)
            results["tp"][tp] = json.loads(out.read_text())

    base = results["tp"][args.tp[0]]
    print(f"\nvLLM {args.device}, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, 576 visual tokens, "
          f"{args.concurrency} requests x {args.max_tokens} answer tokens\n")
    print(f"| TP | setting | prefill TTFT (s) | all-reduces per prefill | all-reduce ms per prefill | share of prefill "
          f"| output tok/s | vs TP={args.tp[0]} | visual tokens per layer |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for tp, rows in results["tp"].items():
        for name, r in rows.items():
            reduce = (f"{r['allreduce_calls_per_prefill']:.0f} | {1000 * r['allreduce_s_per_prefill']:.2f} | "
                      f"{100 * r['allreduce_share_of_prefill']:.2f}%" if "allreduce_calls_per_prefill" in r
                      else "- | - | -")
            print(f"| {tp} | {name} | {r['prefill_ttft_s']:.3f} | {reduce} | {r['output_tokens_per_s']:.1f} | "
                  f"{r['output_tokens_per_s'] / base[name]['output_tokens_per_s']:.2f}x | "
                  f"{(r.get('decisions') or {}).get('visual_tokens_per_layer', '-')} |")
    write_json(args.json, results)


if __name__ == "__main__":
    import torch

    torch.set_grad_enabled(False)
    main()
