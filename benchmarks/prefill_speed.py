"""Prefill (and decode) time, pruned vs unpruned, measured in one run on a mid-size random LLaVA.

The model is LLaVA-1.5-shaped where it matters for cost: 576 visual tokens per image, a text
prompt around them, a Llama decoder of a few hundred MB. Weights are random, so in the first
three settings the pruning schedule is forced (fusion layer, critical tokens, exit layer)
rather than measured; the forced schedule mirrors the 32-layer paper setting scaled to this
depth. A forced schedule skips VisiPruner's per-layer influence check, so those rows are the
cost of pruning alone. The ``measured`` rows run the check and take their own decisions:

``check every layer, never fuse``  layer threshold -1 (fusion never fires): the check's cost
                                   at every layer after K, with no pruning to pay for it.
``shipped thresholds, measured``   the embedded model's shipped config
                                   (``visipruner/models/organism/visipruner_config.json``).
``paper thresholds, measured``     the paper's defaults (0.995 / 0.2 / 0.999, all three stages).

On random weights these decisions say nothing about accuracy; the rows show what the check
costs next to whatever it decided (fusion and exit layer, critical tokens and the number of
layers checked are recorded per row).

Reported per setting: FLOPs-predicted speedup (dense / executed FLOPs of the language model),
realised speedup (median unpruned time / median pruned time, interleaved repeats), and their
ratio. Image features are computed once and passed in, so the vision encoder is in neither
time.

    python benchmarks/prefill_speed.py               # default: 16 layers, hidden 1024
    python benchmarks/prefill_speed.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

import visipruner
from visipruner import Schedule, VisiPrunerConfig
from visipruner.testing import IMAGE_TOKEN_ID, tiny_llava


def build(args, batch: int = 1, device: str = "cpu"):
    """The random model, ``batch`` prompts (each: BOS, ``--prefix - 1`` text tokens, 576 image tokens,
    ``--suffix`` text tokens) and their image features, on ``device``."""
    model = tiny_llava(
        0, hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
        intermediate=args.intermediate, vocab=args.vocab, image_size=336, patch=14, vision_hidden=32,
    ).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.cat([
        torch.tensor([1]), torch.randint(4, args.vocab, (args.prefix - 1,), generator=g),
        torch.full((576,), IMAGE_TOKEN_ID), torch.randint(4, args.vocab, (args.suffix,), generator=g),
    ]) for _ in range(batch)]).to(device)
    pixels = torch.randn(batch, 3, 336, 336, generator=g).to(device)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels, return_dict=True)
    return model, ids, feats


def paper_schedule(layers: int, keep: float) -> tuple[int, Schedule]:
    """The 32-layer paper setting (shallow 6, fusion at 10, exit at 20) scaled to ``layers``: the
    shallow-stage depth K and a forced schedule keeping a fixed random ``keep`` share of the 576
    visual tokens at the fusion layer."""
    K = max(1, round(6 * layers / 32))
    fusion = max(K + 1, round(10 * layers / 32))
    exit_ = max(fusion + 1, round(20 * layers / 32))
    critical = torch.randperm(576, generator=torch.Generator().manual_seed(1))[: int(keep * 576)].tolist()
    return K, Schedule(fusion, critical, exit_)


def shipped_config() -> VisiPrunerConfig:
    """The embedded model's shipped, calibrated VisiPruner config."""
    from pathlib import Path

    from visipruner.methods import config_from_json

    path = Path(visipruner.__file__).parent / "models" / "organism" / "visipruner_config.json"
    return config_from_json(path.read_text())


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def model_arguments(p: argparse.ArgumentParser) -> None:
    """The LLaVA-1.5-shaped random model's size and prompt (shared with ``throughput.py``)."""
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prefix", type=int, default=35, help="text tokens before the image (LLaVA-1.5: 35)")
    p.add_argument("--suffix", type=int, default=40, help="text tokens after the image")
    p.add_argument("--keep", type=float, default=0.1, help="fraction of visual tokens kept at the fusion layer")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=str, default=None, help="write every raw number here")
    p.add_argument("--settings", nargs="+", default=None, metavar="NAME",
                   help="run only these settings (names as printed, quoted)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    model, ids, feats = build(args)
    L = args.layers
    K, forced = paper_schedule(L, args.keep)
    fusion, critical, exit_ = forced.fusion_layer, forced.critical_tokens, forced.exit_layer  # printed below
    settings = {
        "shallow only": (VisiPrunerConfig(stages=("shallow",), shallow_layers=K), None),
        "fusion + exit": (VisiPrunerConfig(stages=("middle", "deep"), shallow_layers=K), forced),
        "all three stages": (VisiPrunerConfig(shallow_layers=K), forced),
        "check every layer, never fuse": (VisiPrunerConfig(shallow_layers=K, layer_threshold=-1.0), None),
        "shipped thresholds, measured": (shipped_config(), None),
        "paper thresholds, measured": (VisiPrunerConfig(shallow_layers=K), None),
    }
    if args.settings:
        unknown = sorted(set(args.settings) - set(settings))
        if unknown:
            p.error(f"--settings: unknown {unknown}; choose from {list(settings)}")
        settings = {k: v for k, v in settings.items() if k in args.settings}
    n_params = sum(p.numel() for p in model.model.language_model.parameters())
    print(f"language model: {L} layers, hidden {args.hidden}, {n_params / 1e6:.0f}M params "
          f"({n_params * 4 / 2**20:.0f} MiB fp32); prompt {ids.shape[1]} tokens (576 visual); "
          f"threads {torch.get_num_threads()}")
    print(f"forced schedule: shallow K={K}, fusion layer {fusion} keeps {len(critical)}/576, exit layer {exit_}")

    def prefill():
        model(input_ids=ids, mm_encoder_outputs={"image": feats}, use_cache=False, logits_to_keep=1)

    def decode_ms_per_token():
        """Prefill (untimed), then time single-token decode steps against the cache."""
        out = model(input_ids=ids, mm_encoder_outputs={"image": feats}, use_cache=True, logits_to_keep=1)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(args.decode_steps):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t) / args.decode_steps * 1e3

    results = []
    for name, (cfg, sched) in tqdm(settings.items(), desc="settings"):
        dense_t, pruned_t = [], []
        prefill()  # warm-up
        with visipruner.apply(model, cfg, schedule=sched) as h:
            prefill()
            stats = h.last_stats
        for _ in range(args.repeats):  # interleave, so drift hits both alike
            dense_t += timed(prefill, 1)
            with visipruner.apply(model, cfg, schedule=sched):
                pruned_t += timed(prefill, 1)
        predicted = stats.dense_prefill_flops / stats.prefill_flops
        realised = statistics.median(dense_t) / statistics.median(pruned_t)
        rec = {
            "setting": name, "config": cfg.to_dict(),
            "schedule": None if sched is None else {"fusion_layer": sched.fusion_layer,
                                                    "critical_tokens": len(sched.critical_tokens),
                                                    "exit_layer": sched.exit_layer},
            "fusion_layer": stats.fusion_layer, "exit_layer": stats.exit_layer,
            "critical_tokens": len(stats.critical_tokens),
            "layers_checked": len(stats.method.get("min_cos_per_layer", {})),
            "avg_visual_tokens": stats.avg_visual_tokens,
            "prefill_flops": stats.prefill_flops, "dense_prefill_flops": stats.dense_prefill_flops,
            "prefill_ms_unpruned": [t * 1e3 for t in dense_t], "prefill_ms_pruned": [t * 1e3 for t in pruned_t],
            "predicted_speedup": predicted, "realised_speedup": realised,
            "realised_over_predicted": realised / predicted,
        }
        if args.decode_steps and name == "all three stages":
            d_dense, d_pruned = [], []
            for _ in range(3):
                d_dense.append(decode_ms_per_token())
                with visipruner.apply(model, cfg, schedule=sched) as h:
                    d_pruned.append(decode_ms_per_token())
                    dstats = h.last_stats
            rec.update({
                "decode_ms_per_token_unpruned": statistics.median(d_dense),
                "decode_ms_per_token_pruned": statistics.median(d_pruned),
                "decode_flops_ratio": sum(dstats.decode_flops) / sum(dstats.dense_decode_flops),
                "kv_cache_tokens_ratio": dstats.kv_cache_tokens() / (ids.shape[1] * L),
            })
        results.append(rec)

    print(f"\n{'setting':<30}{'fusion':>7}{'exit':>6}{'checked':>8}{'vis tok/layer':>14}{'FLOPs ratio':>12}{'predicted':>11}{'realised':>10}{'real/pred':>11}"
          f"{'dense ms':>10}{'pruned ms':>10}")
    for r in results:
        print(f"{r['setting']:<30}{str(r['fusion_layer']):>7}{str(r['exit_layer']):>6}{r['layers_checked']:>8}"
              f"{r['avg_visual_tokens']:>14.1f}{r['prefill_flops'] / r['dense_prefill_flops']:>12.3f}"
              f"{r['predicted_speedup']:>10.2f}x{r['realised_speedup']:>9.2f}x{r['realised_over_predicted']:>11.3f}"
              f"{statistics.median(r['prefill_ms_unpruned']):>10.1f}{statistics.median(r['prefill_ms_pruned']):>10.1f}")
    for r in results:
        if "decode_ms_per_token_pruned" in r:
            print(f"\ndecode ({r['setting']}): {r['decode_ms_per_token_unpruned']:.2f} -> "
                  f"{r['decode_ms_per_token_pruned']:.2f} ms/token; decode FLOPs ratio {r['decode_flops_ratio']:.3f}; "
                  f"KV cache {r['kv_cache_tokens_ratio']:.3f} of unpruned")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/prefill_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "args": vars(args), "torch": torch.__version__, "load_average_at_end": os.getloadavg(),
                       "results": results}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
