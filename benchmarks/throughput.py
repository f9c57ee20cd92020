"""Batched generation, pruned vs unpruned, measured in one run on the LLaVA-1.5-shaped random model
of ``prefill_speed.py`` (576 visual tokens per prompt).

For each batch size: one prefill of the whole batch, then ``--new-tokens`` greedy decode steps
against the cache. Reported per setting: prefill seconds, decode ms per step, tokens per second
(batch x new tokens over prefill + decode), peak KV-cache bytes (what the cache holds after the
last step), the FLOPs-predicted prefill speed-up and the realised one. Pruned and unpruned runs
are interleaved and each figure is the median of ``--repeats``. Settings:

* ``paper-like (forced)``: VisiPruner's three stages with a forced schedule scaled from the
  32-layer paper setting (shallow 6, fusion 10 keeping ``--keep`` of the visual tokens, exit 20);
* ``calibrated thresholds``: the embedded model's shipped config (its thresholds, decisions
  measured on this random model: what a calibrated config costs when it is applied as is).

Image features are computed once and passed in (the vision encoder is in neither time). The
language model has LLaVA-1.5's multi-head attention (as many KV heads as query heads) unless
``--kv-heads`` says otherwise; with grouped-query attention the KV cache is a smaller share of a
decode step, and so is what evicting it saves.

KV bytes are reported twice: what the cache's tensors hold (a padded batch's cache is, per layer,
as wide as its longest row there) and what the rows' own tokens need (what a per-row, ragged or
paged, cache would hold).

    python benchmarks/throughput.py --batch-sizes 1,4,16 --json runs/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import torch

sys.path.insert(0, os.path.dirname(__file__))
import visipruner  # noqa: E402
from prefill_speed import build, model_arguments, paper_schedule, shipped_config  # noqa: E402
from visipruner import VisiPrunerConfig  # noqa: E402
from visipruner.evaluate import rows_kv_bytes, time_generation as run_once  # noqa: E402


def build_organism(model, processor, batch: int) -> dict:
    """A left-padded batch of the embedded model's held-out questions (``bench --quick``'s set)."""
    from visipruner.bench import _inputs, default_questions
    from visipruner.evaluate import collate_prompts

    qs = default_questions(True)
    prompts = [_inputs(processor, qs[i % len(qs)], model) for i in range(batch)]
    return collate_prompts(prompts, processor.tokenizer.pad_token_id)


def padded_prediction(model, stats) -> float:
    """The FLOPs-predicted prefill speed-up of the batch as it runs padded: unpruned, every row at the
    longest prompt's length; pruned, each row's executed FLOPs plus the padding the runtime added
    (``padding_flops``: every layer at that layer's longest row)."""
    from visipruner import flops

    cfg = model.config.get_text_config()
    dims = flops.Dims.from_config(cfg)

    def unpruned(n):
        return cfg.num_hidden_layers * flops.layer_flops(dims, n, flops.causal_pairs(n), flops.causal_pairs(n))

    dense = len(stats) * unpruned(max(s.prompt_length for s in stats))
    pruned = sum((s.prefill_flops if s.pruning_applied else unpruned(s.prompt_length)) + s.padding_flops
                 for s in stats)
    return dense / pruned


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,4,16")
    model_arguments(p)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--settings", default="paper,calibrated",
                   help="which settings of the random model: paper (forced schedule), paper-md (the same without "
                        "the shallow stage, as the vLLM plugin serves), calibrated (thresholds)")
    p.add_argument("--organism", action="store_true",
                   help="the embedded model on its held-out questions (left-padded batches) with its shipped "
                        "calibrated config, instead of the random LLaVA-shaped model")
    p.set_defaults(kv_heads=None)  # LLaVA-1.5: multi-head attention
    p.add_argument("--json")
    p.add_argument("--png", help="throughput against batch size (default: next to --json)")
    args = p.parse_args(argv)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    L = args.layers
    K, forced = paper_schedule(L, args.keep)
    settings = {  # --settings key: (name, config, schedule)
        "paper": ("paper-like (forced)", VisiPrunerConfig(shallow_layers=K), forced),
        # the same schedule without the shallow stage: what the vLLM plugin serves (vllm_throughput.py)
        "paper-md": ("forced, middle+deep", VisiPrunerConfig(stages=("middle", "deep"), shallow_layers=K), forced),
        "calibrated": ("calibrated thresholds", shipped_config(), None),
    }
    settings = {name: (cfg, sched) for key, (name, cfg, sched) in settings.items() if key in args.settings.split(",")}
    if args.organism:
        from visipruner.models import load_organism

        organism, processor = load_organism(device=args.device)
        settings = {"calibrated config (measured)": (shipped_config(), None)}
    results = []
    for b in sizes:
        if args.organism:
            model, inputs = organism, build_organism(organism, processor, b)
            inputs = {k: v.to(args.device) for k, v in inputs.items()}
        else:
            model, ids, feats = build(args, b, args.device)
            inputs = {"input_ids": ids, "mm_encoder_outputs": {"image": feats}}
        run_once(model, inputs, 2)  # warm-up
        for name, (cfg, sched) in settings.items():
            dense, pruned = [], []
            for _ in range(args.repeats):  # interleaved
                dense.append(run_once(model, inputs, args.new_tokens))
                with visipruner.apply(model, cfg, schedule=sched) as h:
                    pruned.append(run_once(model, inputs, args.new_tokens))
                    stats = h.batch_stats
            med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
            predicted = sum(s.dense_prefill_flops for s in stats) / sum(s.prefill_flops for s in stats)
            rec = {"batch": b, "setting": name, "config": cfg.to_dict(),
                   "fusion_layers": [s.fusion_layer for s in stats], "exit_layers": [s.exit_layer for s in stats],
                   "avg_visual_tokens": statistics.mean(s.avg_visual_tokens for s in stats),
                   "prefill_s_unpruned": med(dense, 0), "prefill_s_pruned": med(pruned, 0),
                   "decode_ms_unpruned": med(dense, 1) * 1e3, "decode_ms_pruned": med(pruned, 1) * 1e3,
                   "kv_bytes_unpruned": dense[0][2], "kv_bytes_pruned": pruned[0][2],
                   "predicted_prefill_speedup": predicted, "raw": {"unpruned": dense, "pruned": pruned}}
            rec["predicted_prefill_speedup_padded"] = padded_prediction(model, stats)
            rec["realised_prefill_speedup"] = rec["prefill_s_unpruned"] / rec["prefill_s_pruned"]
            rec["realised_over_predicted"] = rec["realised_prefill_speedup"] / predicted
            for side in ("unpruned", "pruned"):
                total = rec[f"prefill_s_{side}"] + rec[f"decode_ms_{side}"] / 1e3 * (args.new_tokens - 1)
                rec[f"tokens_per_s_{side}"] = b * args.new_tokens / total
                rec[f"decode_tokens_per_s_{side}"] = b / (rec[f"decode_ms_{side}"] / 1e3)
            rec["decode_throughput_ratio"] = rec["decode_tokens_per_s_pruned"] / rec["decode_tokens_per_s_unpruned"]
            rec["kv_bytes_ratio"] = rec["kv_bytes_pruned"] / rec["kv_bytes_unpruned"]
            rec["kv_bytes_rows_pruned"] = rows_kv_bytes(model, stats, args.new_tokens - 1)
            rec["kv_bytes_rows_unpruned"] = rows_kv_bytes(model, stats, args.new_tokens - 1, pruned=False)
            rec["kv_bytes_rows_ratio"] = rec["kv_bytes_rows_pruned"] / rec["kv_bytes_rows_unpruned"]
            results.append(rec)
            print(f"batch {b:>3} {name:<22} prefill {rec['prefill_s_unpruned']:.2f}->{rec['prefill_s_pruned']:.2f} s "
                  f"(real/pred {rec['realised_over_predicted']:.2f}, padded {rec['realised_prefill_speedup'] / rec['predicted_prefill_speedup_padded']:.2f}) decode {rec['decode_ms_unpruned']:.0f}->"
                  f"{rec['decode_ms_pruned']:.0f} ms/step ({rec['decode_throughput_ratio']:.2f}x tokens/s) "
                  f"KV {rec['kv_bytes_ratio']:.2f}x (rows' own tokens {rec['kv_bytes_rows_ratio']:.2f}x)", flush=True)
        if not args.organism:
            del model
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
        print(f"wrote {args.json}")
    png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    if png:
        title = ("embedded model" if args.organism else
                 f"{L}-layer LLaVA-shaped model, {args.kv_heads} KV heads / {args.heads} heads")
        plot(results, png, f"{title} ({args.device}), {args.new_tokens} new tokens")
        print(f"wrote {png}")


def plot(results: list[dict], path: str, title: str) -> None:
    """Decode tokens/s and KV-cache MiB against batch size, pruned (each setting) and unpruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in results))
    fig, (ax, kx) = plt.subplots(1, 2, figsize=(10, 4))
    for i, name in enumerate(settings):
        rs = [r for r in results if r["setting"] == name]
        b = [r["batch"] for r in rs]
        ax.plot(b, [r["decode_tokens_per_s_pruned"] for r in rs], "o-", color=f"C{i}", label=f"pruned: {name}")
        kx.plot(b, [r["kv_bytes_pruned"] / 2**20 for r in rs], "o-", color=f"C{i}", label=f"pruned: {name} (cache)")
        kx.plot(b, [r["kv_bytes_rows_pruned"] / 2**20 for r in rs], "x:", color=f"C{i}",
                label=f"pruned: {name} (rows' own tokens)")
    rs = [r for r in results if r["setting"] == settings[0]]
    b = [r["batch"] for r in rs]
    ax.plot(b, [r["decode_tokens_per_s_unpruned"] for r in rs], "s--k", label="unpruned")
    kx.plot(b, [r["kv_bytes_unpruned"] / 2**20 for r in rs], "s--k", label="unpruned")
    for x, ylabel in ((ax, "decode tokens / s"), (kx, "KV cache after the last step (MiB)")):
        x.set_xscale("log", base=2)
        x.set_xlabel("batch size")
        x.set_ylabel(ylabel)
        x.legend(fontsize=7)
        x.grid(alpha=0.3)
    kx.set_yscale("log", base=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

if __name__ == "__main__":
    main()
