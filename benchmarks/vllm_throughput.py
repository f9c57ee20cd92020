"""Serving throughput under vLLM: stock vLLM vs the visipruner plugin, measured in one run.

The model is ``benchmarks/prefill_speed.py``'s LLaVA-1.5-shaped random model (576 visual tokens per
image, a 16-layer Llama decoder of hidden 1024), saved as model folders: one without a pruning config
(vLLM's own forward runs: stock vLLM) and one per plugin setting:

``forced schedule``    VisiPruner with the paper's 32-layer schedule scaled to this depth (fusion,
                       a fixed random ``--keep`` share of critical tokens, exit); no influence check.
``measured``           VisiPruner's middle and deep stages with the paper's thresholds: the
                       influence check runs at every layer after K and takes its own decisions
                       (on random weights they say nothing about accuracy; recorded per row).
``forced schedule + KV bound``  the forced schedule with ``exit_by`` = its exit layer + 1 (and its
                       fusion layer as a budget bound): vLLM allocates the layers after fusion the
                       request's text + the critical tokens, the layers after the exit its text only
                       (``visipruner/vllm/kv_memory.py``; engine started with its ``--scheduler-cls``).

Per setting and concurrency (``--concurrency``, default 1 8 32): that many requests (image + text
prompt, ``--max-tokens`` answer tokens, EOS ignored) submitted at once to the engine, repeated
``--repeats`` times; reported: requests/s, output tokens/s, time to first token (TTFT, median) and
inter-token latency (ITL, median over requests of their mean gap), and from vLLM's own scheduler the
most requests running at once, the highest KV-cache usage and the KV blocks an image request holds
(in layer-blocks: blocks x layers a block spans, over its KV-cache groups; at a fixed
``--kv-cache-gib`` the engine queues what does not fit). Prefill alone: TTFT of one request
with one answer token, stock and plugin interleaved (``--prefill-repeats``); realised speedup =
stock / plugin median, predicted = dense / executed prefill FLOPs of the language model (the
plugin's per-request record), and their ratio. All engines live in this process, eager.

    python benchmarks/vllm_throughput.py                       # CPU: vLLM's CPU backend
    python benchmarks/vllm_throughput.py --device cuda         # a GPU with vLLM installed
    python benchmarks/vllm_throughput.py --json runs/vllm_throughput.json
    python benchmarks/vllm_throughput.py --settings "forced schedule + KV bound" --kv-cache-gib 0.25 \
        --concurrency 8 16 32 48                               # KV memory at a fixed budget
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM's own switch: engines in this process

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from prefill_speed import paper_schedule  # noqa: E402
from visipruner import VisiPrunerConfig  # noqa: E402
from visipruner.testing import CHATML_TEMPLATE, tiny_llava, tiny_tokenizer  # noqa: E402
from visipruner.vllm.folders import save_for_vllm  # noqa: E402


def build_folders(args, root: Path) -> dict:
    """The random LLaVA-1.5-shaped model saved once per setting: {name: (folder, config or None)}."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = tiny_tokenizer(["<image>"])
    model = tiny_llava(0, hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                       intermediate=args.intermediate, vocab=args.vocab, image_size=336, patch=14, vision_hidden=32)
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")
    ip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          chat_template=CHATML_TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    K, schedule = paper_schedule(args.layers, args.keep)
    middle_deep = ("middle", "deep")
    settings = {
        "stock vLLM": (None, None),
        "forced schedule": (VisiPrunerConfig(stages=middle_deep, shallow_layers=K), schedule),
        "measured": (VisiPrunerConfig(stages=middle_deep, shallow_layers=K), None),
        "forced schedule + KV bound": (VisiPrunerConfig(stages=middle_deep, shallow_layers=K,
                                                        exit_by=schedule.exit_layer + 1), schedule),
    }
    out = {}
    for i, (name, (cfg, sched)) in enumerate(settings.items()):
        if args.settings and name not in args.settings:
            continue
        out[name] = (save_for_vllm(model, proc, root / f"s{i}", config=cfg, schedule=sched), cfg)
    return out


def engine(path, config, args):
    from vllm import LLM

    from visipruner.vllm.kv_memory import SCHEDULER

    kw = dict(dtype=args.dtype, enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False,
              max_model_len=1024, max_num_batched_tokens=1024 * 8, max_num_seqs=max(args.concurrency), seed=0)
    if getattr(config, "exit_by", None) is not None:
        kw["scheduler_cls"] = SCHEDULER  # the plugin's KV memory after the bound
    if args.kv_cache_gib is not None:  # a fixed KV budget (CPU and GPU alike)
        kw.update(kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30))
    if args.device == "cpu":
        kw.update(gpu_memory_utilization=0.1, kv_cache_memory_bytes=kw.get("kv_cache_memory_bytes", 4 << 30))
    else:
        kw.update(gpu_memory_utilization=0.5)
    return LLM(model=str(path), **kw)


def requests_for(n: int, args, seed: int) -> list:
    """n distinct image + text prompts (vLLM's prompt dicts)."""
    import numpy as np
    from PIL import Image

    from visipruner.testing import TINY_WORDS

    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        words = " ".join(rng.choice(TINY_WORDS[:-3], args.suffix))
        image = Image.fromarray((rng.rand(336, 336, 3) * 255).astype("uint8"))
        out.append({"prompt": f"<|im_start|>user\n<image>\n{words}<|im_end|>\n<|im_start|>assistant\n",
                    "multi_modal_data": {"image": image}})
    return out


def run_batch(llm, prompts, max_tokens: int) -> dict:
    """All prompts submitted at once; per-request token arrival times from the engine's step loop."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    sched = eng.engine_core.engine_core.scheduler  # the engine in this process: vLLM's own accounting
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    span = max(len(g.layer_names) for g in sched.kv_cache_config.kv_cache_groups)  # layers one block spans
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    arrivals = {str(i): [] for i in range(len(prompts))}
    seen = {k: 0 for k in arrivals}
    held, usage, blocks = 0, 0.0, {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            now = time.perf_counter()
            n = len(out.outputs[0].token_ids)
            arrivals[out.request_id] += [now] * (n - seen[out.request_id])
            seen[out.request_id] = n
        held, usage = max(held, len(sched.running)), max(usage, sched.kv_cache_manager.usage)
        for r in sched.running:
            b = span * sum(len(m.req_to_blocks.get(r.request_id, ())) for m in managers)
            blocks[r.request_id] = max(blocks.get(r.request_id, 0), b)
    total = time.perf_counter() - t0
    ttft = [a[0] - t0 for a in arrivals.values()]
    itl = [statistics.mean(b - a for a, b in zip(ts, ts[1:])) for ts in arrivals.values() if len(ts) > 1]
    tokens = sum(len(a) for a in arrivals.values())
    return {"seconds": total, "requests_per_s": len(prompts) / total, "output_tokens_per_s": tokens / total,
            "ttft_s": statistics.median(ttft), "itl_s": statistics.median(itl) if itl else None,
            "max_running": held, "max_kv_usage": usage,  # blocks: None when every request ended in its first step
            "kv_layer_blocks_per_request": statistics.median(blocks.values()) if blocks else None}


def model_arguments(p: argparse.ArgumentParser) -> None:
    """The random LLaVA-1.5-shaped model and its prompts (``build_folders``, ``requests_for``), and the device."""
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16, help="query heads (divisible by the tensor-parallel size)")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--suffix", type=int, default=40, help="text words after the image")
    p.add_argument("--keep", type=float, default=0.1, help="share of visual tokens kept at the forced schedule's fusion")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=32, help="answer tokens per request (EOS ignored)")
    p.add_argument("--repeats", type=int, default=2, help="batches per concurrency level")
    p.add_argument("--prefill-repeats", type=int, default=7)
    p.add_argument("--settings", nargs="+", default=None, metavar="NAME",
                   help="subset of: 'stock vLLM', 'forced schedule', 'measured', 'forced schedule + KV bound' "
                   "(stock always runs)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="fixed KV cache size (vLLM's kv_cache_memory_bytes); default: 4 on CPU, vLLM's own on GPU")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.settings and "stock vLLM" not in args.settings:
        args.settings.append("stock vLLM")

    from visipruner.vllm.records import RECENT

    results = {"args": vars(args), "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_folders(args, Path(tmp))
        engines = {name: engine(path, cfg, args) for name, (path, cfg) in folders.items()}
        warm = requests_for(2, args, seed=99)
        for llm in engines.values():
            run_batch(llm, warm, 2)  # first-call costs (kernels, processor) out of the figures

        # prefill alone: one request, one token, settings interleaved
        ttft = {name: [] for name in engines}
        flops_ratio = {name: [] for name in engines}
        one = requests_for(1, args, seed=7)
        for _ in range(args.prefill_repeats):
            for name, llm in engines.items():
                RECENT.clear()
                ttft[name].append(run_batch(llm, one, 1)["ttft_s"])
                if RECENT:
                    flops_ratio[name].append(RECENT[-1]["prefill_flops_ratio"])
        stock_prefill = statistics.median(ttft["stock vLLM"])
        for name in engines:
            row = results["settings"].setdefault(name, {})
            row["prefill_ttft_s"] = statistics.median(ttft[name])
            if flops_ratio[name]:
                row["predicted_speedup"] = 1 / statistics.median(flops_ratio[name])
                row["realised_speedup"] = stock_prefill / row["prefill_ttft_s"]
                row["realised_over_predicted"] = row["realised_speedup"] / row["predicted_speedup"]

        # throughput at each concurrency, settings interleaved per repeat
        for c in args.concurrency:
            runs = {name: [] for name in engines}
            for rep in range(args.repeats):
                prompts = requests_for(c, args, seed=1000 * c + rep)
                for name, llm in engines.items():
                    RECENT.clear()
                    runs[name].append(run_batch(llm, prompts, args.max_tokens))
                    if RECENT:
                        runs[name][-1]["decisions"] = [
                            {k: r[k] for k in ("fusion_layer", "exit_layer", "critical_tokens", "prefill_flops_ratio")}
                            for r in list(RECENT)[:3]]
            for name in engines:
                best = {k: statistics.median(r[k] for r in runs[name]) for k in
                        ("requests_per_s", "output_tokens_per_s", "ttft_s", "max_running", "max_kv_usage",
                         "kv_layer_blocks_per_request")}
                itls = [r["itl_s"] for r in runs[name] if r["itl_s"] is not None]
                best["itl_s"] = statistics.median(itls) if itls else None
                best["decisions"] = runs[name][-1].get("decisions")
                results["settings"][name][f"c{c}"] = best
        for llm in engines.values():
            del llm

    stock = results["settings"]["stock vLLM"]
    print(f"\nvLLM {args.device}, {args.layers} layers, hidden {args.hidden}, 576 visual tokens, "
          f"{args.max_tokens} answer tokens\n")
    print("| setting | prefill TTFT (s) | predicted | realised | realised/predicted |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in results["settings"].items():
        pred = row.get("predicted_speedup")
        print(f"| {name} | {row['prefill_ttft_s']:.3f} | " + (
            f"{pred:.2f}x | {row['realised_speedup']:.2f}x | {row['realised_over_predicted']:.2f} |" if pred else "- | - | - |"))
    print("\n| setting | concurrency | requests/s | output tok/s | vs stock | TTFT (s) | ITL (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in args.concurrency:
        for name, row in results["settings"].items():
            r = row[f"c{c}"]
            ratio = r["output_tokens_per_s"] / stock[f"c{c}"]["output_tokens_per_s"]
            itl = f"{1000 * r['itl_s']:.1f}" if r["itl_s"] is not None else "-"
            print(f"| {name} | {c} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | {ratio:.2f}x | "
                  f"{r['ttft_s']:.2f} | {itl} |")
    kv = f"{args.kv_cache_gib:g} GiB" if args.kv_cache_gib is not None else (
        "4 GiB" if args.device == "cpu" else "vLLM's own size")
    print(f"\n| setting | concurrency | most running (vs stock) | KV usage | KV layer-blocks / request (vs stock) "
          f"| output tok/s (vs stock) |   [KV cache {kv}]")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for c in args.concurrency:
        for name, row in results["settings"].items():
            r, s = row[f"c{c}"], stock[f"c{c}"]
            print(f"| {name} | {c} | {r['max_running']:g} ({r['max_running'] / s['max_running']:.2f}x) | "
                  f"{r['max_kv_usage']:.2f} | {r['kv_layer_blocks_per_request']:g} "
                  f"({r['kv_layer_blocks_per_request'] / s['kv_layer_blocks_per_request']:.2f}x) | "
                  f"{r['output_tokens_per_s']:.1f} ({r['output_tokens_per_s'] / s['output_tokens_per_s']:.2f}x) |")
    write_json(args.json, results)


def write_json(path: str | None, results: dict) -> None:
    """Every number of a run, when ``--json`` names a file."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
