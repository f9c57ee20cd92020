"""Why a calibrated VisiPruner config fires on one source and not another: the influence
distributions per source, measured with calibrate's recorder (one unpruned prefill per question).

    python scripts/source_shift.py --data scenes=runs/shift/scenes.jsonl --data photos=runs/shift/photos.jsonl \
        --config visipruner/models/organism/visipruner_config.json --json docs/results/source_shift.json

Per source and checked layer: the last token's min_j cos(o - c_j, o) (the fusion trigger), the
largest ||c_j|| and ||c_j|| / ||o|| (the critical-token score, absolute and relative), ||o||, the
visual tokens' joint share sum_j ||c_j|| / ||o|| and how often the layer counts as quiet for the
exit (min cos >= exit_threshold); per
example: whether the config's layer threshold fires, where, and how many tokens its token
threshold keeps there. Writes a JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def summarise(rec, cfg) -> dict:
    K = rec.K
    cos = np.where(np.isnan(rec.cos), np.inf, rec.cos)
    min_cos = cos.min(axis=2)[:, K + 1:]  # (E, layers checked)
    layers = np.arange(K + 1, rec.cos.shape[1])
    nvis = rec.n_visual
    mask = np.arange(rec.norm.shape[2])[None, :] < nvis[:, None]
    norm = rec.norm[:, K + 1:]
    rel = norm / rec.onorm[:, K + 1:, None]
    total = np.where(mask[:, None], rel, 0).sum(axis=2)  # (E, layers checked)
    below = min_cos < cfg.layer_threshold
    fused = below.any(axis=1)
    fusion = np.where(fused, below.argmax(axis=1), -1)
    kept = []
    for e in np.nonzero(fused)[0]:
        score = rel[e, fusion[e]] if cfg.relative_tokens_threshold else norm[e, fusion[e]]
        kept.append(float((score[: nvis[e]] > cfg.tokens_threshold).mean()))
    q = lambda a: {p: float(np.quantile(a, p / 100)) for p in (10, 25, 50, 75, 90)}  # noqa: E731
    return {
        "examples": int(len(nvis)),
        "fusion_rate": float(fused.mean()),
        "fusion_layer_median": float(np.median(layers[fusion[fused]])) if fused.any() else None,
        "kept_fraction_at_fusion_median": float(np.median(kept)) if kept else None,
        "min_over_layers_of_min_cos": q(min_cos.min(axis=1)),
        "per_layer": {
            "layers": layers.tolist(),
            "min_cos_median": np.median(min_cos, axis=0).tolist(),
            "min_cos_q10": np.quantile(min_cos, 0.1, axis=0).tolist(),
            "min_cos_q90": np.quantile(min_cos, 0.9, axis=0).tolist(),
            "max_norm_median": np.median(np.where(mask[:, None], norm, 0).max(axis=2), axis=0).tolist(),
            "max_rel_norm_median": np.median(np.where(mask[:, None], rel, 0).max(axis=2), axis=0).tolist(),
            "output_norm_median": np.median(rec.onorm[:, K + 1:], axis=0).tolist(),
            # all visual tokens together: sum_j ||c_j|| / ||o|| bounds how far removing every one moves o
            "sum_rel_norm_median": np.median(total, axis=0).tolist(),
            "sum_rel_norm_q10": np.quantile(total, 0.1, axis=0).tolist(),
            "sum_rel_norm_q90": np.quantile(total, 0.9, axis=0).tolist(),
            # the share of examples whose layer counts as "no visual impact" for the exit
            "exit_quiet_share": (min_cos >= cfg.exit_threshold).mean(axis=0).tolist(),
        },
        "norm_all_tokens": q(norm[np.broadcast_to(mask[:, None], norm.shape)]),
        "rel_norm_all_tokens": q(rel[np.broadcast_to(mask[:, None], rel.shape)]),
        "output_norm": q(rec.onorm[:, K + 1:].ravel()),
    }


def plot(result: dict, path: str, cfg) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    axes = axes.ravel()
    quiet_axis = None
    for i, (name, s) in enumerate(result["sources"].items()):
        p = s["per_layer"]
        axes[0].plot(p["layers"], p["min_cos_median"], color=f"C{i}", label=f"{name} (median)")
        axes[0].fill_between(p["layers"], p["min_cos_q10"], p["min_cos_q90"], color=f"C{i}", alpha=0.2)
        axes[1].plot(p["layers"], p["max_norm_median"], color=f"C{i}", label=name)
        axes[2].plot(p["layers"], p["max_rel_norm_median"], color=f"C{i}", label=name)
        if "sum_rel_norm_median" in p:
            axes[3].plot(p["layers"], p["sum_rel_norm_median"], color=f"C{i}", label=f"{name} (median)")
            axes[3].fill_between(p["layers"], p["sum_rel_norm_q10"], p["sum_rel_norm_q90"], color=f"C{i}", alpha=0.2)
            if quiet_axis is None:
                quiet_axis = axes[3].twinx()
            quiet_axis.plot(p["layers"], p["exit_quiet_share"], color=f"C{i}", ls=":", lw=1.2)
    axes[0].axhline(cfg.layer_threshold, color="k", ls="--", lw=1, label="layer_threshold")
    if not cfg.relative_tokens_threshold:
        axes[1].axhline(cfg.tokens_threshold, color="k", ls="--", lw=1, label="tokens_threshold")
    axes[0].set_title("min_j cos(o - c_j, o), 10-90% band", fontsize=9)
    axes[1].set_title("largest ||c_j|| (median over examples)", fontsize=9)
    axes[2].set_title("largest ||c_j|| / ||o|| (median over examples)", fontsize=9)
    axes[3].set_title("all visual tokens: sum_j ||c_j|| / ||o||, 10-90% band (what the exit removes);\n"
                      "dotted, right axis: share of examples where the layer is quiet for the exit", fontsize=9)
    if quiet_axis is not None:
        quiet_axis.set_ylim(0, 1)
        quiet_axis.set_ylabel("share quiet (min cos >= exit_threshold)", fontsize=8)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from visipruner.bench import _inputs
    from visipruner.calibrate import record
    from visipruner.config import VisiPrunerConfig
    from visipruner.data.questions import load_questions
    from visipruner.models import load_organism

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", help="NAME=FILE.jsonl (repeat per source)")
    p.add_argument("--config", required=True, help="the VisiPruner config whose thresholds are examined")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", required=True)
    p.add_argument("--replot", action="store_true", help="only redraw the PNG beside --json from that JSON")
    a = p.parse_args(argv)
    cfg = VisiPrunerConfig.from_json(Path(a.config).read_text())
    if a.replot:
        plot(json.loads(Path(a.json).read_text()), str(Path(a.json).with_suffix(".png")), cfg)
        return 0
    if not a.data:
        p.error("--data is required (unless --replot)")
    model, processor = load_organism()
    out = {"config": cfg.to_dict(), "sources": {}}
    for spec in a.data:
        name, _, path = spec.partition("=")
        qs = load_questions(path)[: a.limit]
        rec = record(model, [_inputs(processor, q, model) for q in qs], cfg.shallow_layers,
                     shallow="shallow" in cfg.stages)
        out["sources"][name] = s = summarise(rec, cfg)
        print(f"{name}: fusion rate {s['fusion_rate']:.2f}, min over layers of min cos median "
              f"{s['min_over_layers_of_min_cos'][50]:.5f} (threshold {cfg.layer_threshold}), "
              f"||c_j|| median {s['norm_all_tokens'][50]:.3g}, ||o|| median {s['output_norm'][50]:.3g}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    plot(out, str(Path(a.json).with_suffix(".png")), cfg)
    print(f"wrote {a.json} and {Path(a.json).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
