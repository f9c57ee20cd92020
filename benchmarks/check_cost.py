"""What VisiPruner's own per-layer check costs, on the embedded model, measured in one run.

VisiPruner reads the last query's influence row (``cos(o - c_j, o)`` and ``||c_j||`` for every
visual token) at each layer after the shallow stage until fusion, and again after fusion until
the exit fires. Token pruning cannot hide that cost, so it is what separates VisiPruner's
realised speed-up from a pure token-count time model. Reported:

* ``influence_ms``: ``last_row_influence`` alone at the model's shapes (before / after fusion);
* prefill times of the same prompts, interleaved and medianed: unpruned; the shipped config;
  the shipped config without the deep stage (no checks after fusion); and a config that checks
  every layer but never fuses (pure check overhead, nothing removed).

    python benchmarks/check_cost.py [--prompts 4] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time

import torch
from tqdm import tqdm

from visipruner import apply, recommended_config
from visipruner.attention import last_row_influence
from visipruner.bench import _inputs
from visipruner.data import scenes
from visipruner.data.questions import load_questions
from visipruner.models import load_organism


def _influence_ms(model, n: int, m: int, iters: int = 200) -> float:
    tc = model.config.text_config
    hd = tc.hidden_size // tc.num_attention_heads
    q = torch.randn(1, tc.num_attention_heads, 1, hd)
    k = torch.randn(1, tc.num_key_value_heads, n, hd)
    v = torch.randn(1, tc.num_key_value_heads, n, hd)
    vis = torch.arange(n - m - 8, n - 8)
    for _ in range(20):
        last_row_influence(q, k, v, hd**-0.5, vis)
    t = time.perf_counter()
    for _ in range(iters):
        last_row_influence(q, k, v, hd**-0.5, vis)
    return (time.perf_counter() - t) / iters * 1e3


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, processor = load_organism()
    model.eval()
    shipped = recommended_config(model)
    configs = {
        "unpruned": None,
        "shipped": shipped,
        "shipped, no deep stage": dataclasses.replace(shipped, stages=tuple(s for s in shipped.stages if s != "deep")),
        "checks only (never fuses)": dataclasses.replace(shipped, stages=("middle",), layer_threshold=-1.0),
    }
    with tempfile.TemporaryDirectory() as d:
        qs = load_questions(scenes.write_split(d, "dev", n=a.prompts, seed=0, start=7000))
        prompts = []
        for q in qs:
            inp = _inputs(processor, q, model)
            feats = model.model.get_image_features(pixel_values=inp.pop("pixel_values"), return_dict=True)
            prompts.append((inp, {"mm_encoder_outputs": {"image": feats}}))

    def once(inp, extra, cfg):
        if cfg is None:
            t = time.perf_counter()
            model(**inp, **extra, use_cache=False, logits_to_keep=1)
            return time.perf_counter() - t
        with apply(model, cfg):
            t = time.perf_counter()
            model(**inp, **extra, use_cache=False, logits_to_keep=1)
            return time.perf_counter() - t

    ms = {name: [] for name in configs}
    for inp, extra in tqdm(prompts, desc="prompts"):
        for cfg in configs.values():
            once(inp, extra, cfg)  # warm-up
        per = {name: [] for name in configs}
        for _ in range(a.repeats):  # interleaved
            for name, cfg in configs.items():
                per[name].append(once(inp, extra, cfg))
        for name in configs:
            ms[name].append(statistics.median(per[name]) * 1e3)
    n = int(prompts[0][0]["input_ids"].shape[1])
    m = model.config.image_seq_length
    out = {
        "influence_ms_full_prompt": _influence_ms(model, n, m),
        "influence_ms_after_fusion": _influence_ms(model, n - m // 2, m // 2),
        "prompt_tokens": n,
        "prefill_ms": {name: sum(v) / len(v) for name, v in ms.items()},
        "threads": a.threads,
    }
    dense = out["prefill_ms"]["unpruned"]
    L = model.config.text_config.num_hidden_layers
    print(f"last_row_influence: {out['influence_ms_full_prompt']:.3f} ms at {n} tokens, "
          f"{out['influence_ms_after_fusion']:.3f} ms at {n - m // 2}")
    print(f"unpruned prefill {dense:.1f} ms ({dense / L:.2f} ms a layer over {L} layers)")
    for name, v in out["prefill_ms"].items():
        print(f"  {name:<28} {v:7.1f} ms  ratio {v / dense:.3f}")
    print(f"check overhead (checks only - unpruned) per layer: "
          f"{(out['prefill_ms']['checks only (never fuses)'] - dense) / (L - shipped.shallow_layers - 1):.3f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
