"""`visipruner bench --budgets`: every method at the field's fixed token budgets.

The field compares token pruning at fixed budgets (64 / 128 / 192 of LLaVA-1.5's 576 visual
tokens, i.e. 11% / 22% / 33%) and reports each method's score as a percentage of the unpruned
model's. A budget ``b`` is a fraction of the prompt's visual tokens, held on average over the
language model's layers: methods acting before the language model (CDPruner, DivPrune,
VisionZip) keep ``b`` of them at every layer; methods acting inside it get the configuration
whose average visual tokens per layer is ``b`` (``bench.matched_configs``; e.g. FastV at layer 2
keeps a little less than ``b`` after it), and VisiPruner keeps the budget's most influential
tokens at its fusion layer (its budget mode, ``VisiPrunerConfig(keep_ratio=...)``, with a fusion
fallback at half depth unless the config names one), then its deep stage as configured: its
average visual tokens per layer is reported next to its score, not matched.

% retained = accuracy / unpruned accuracy on the same questions, with a 90% bootstrap interval
(questions resampled, pruned and unpruned answers kept in pairs). Questions without a gold answer
(real photos: ``visipruner.data.photos``) are scored by agreement instead (``score="agreement"``):
a pruned answer counts as right when it equals the unpruned model's, so % retained is the agreement
in percent, and the unpruned row is 100 by definition.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from .config import MethodConfig, VisiPrunerConfig
from .methods import CDPrunerConfig, DivPruneConfig

BUDGETS = (0.11, 0.22, 0.33)


def visipruner_budget_config(cfg: VisiPrunerConfig, budget: float, num_layers: int) -> VisiPrunerConfig | None:
    """``cfg`` in budget mode, or None when this VisiPrunerConfig has no budget mode. A config without
    a fusion fallback layer gets half the depth (as VTW's default), so that every prompt is pruned
    to the budget even where the layer threshold does not fire."""
    if "keep_ratio" not in {f.name for f in dataclasses.fields(VisiPrunerConfig)}:
        return None
    fields = {k: v for k, v in cfg.to_dict().items() if k not in ("method", "keep_ratio", "keep_tokens")}
    if fields.get("fusion_fallback_layer") is None:
        fields["fusion_fallback_layer"] = max(cfg.shallow_layers + 1, num_layers // 2)
    return VisiPrunerConfig(**fields, keep_ratio=budget)


def budget_configs(num_layers: int, budget: float, visipruner_cfg: VisiPrunerConfig, methods) -> dict[str, MethodConfig]:
    """Each method's config at ``budget`` (a fraction of the prompt's visual tokens)."""
    from .bench import matched_configs

    out = {name: cfg for name, cfg in matched_configs(num_layers, budget, visipruner_cfg).items() if name != "attention"}
    out["cdpruner"] = CDPrunerConfig(keep_ratio=budget)
    out["divprune"] = DivPruneConfig(keep_ratio=budget)
    vp = visipruner_budget_config(visipruner_cfg, budget, num_layers)
    if vp is not None:
        out["visipruner"] = vp
    return {name: cfg for name, cfg in out.items() if name in methods}


def retained(correct, correct_unpruned, draws: int = 2000) -> tuple[float, list[float]]:
    """Accuracy as % of the unpruned accuracy, and its 90% bootstrap interval (paired resampling)."""
    from .bench import INTERVAL, _bootstrap_rng

    c, u = np.asarray(correct, float), np.asarray(correct_unpruned, float)
    if u.sum() == 0:
        raise ValueError("the unpruned model answered no question correctly: % retained is undefined")
    idx = _bootstrap_rng().integers(0, len(c), size=(draws, len(c)))
    den = u[idx].sum(1)
    ratios = 100.0 * c[idx].sum(1)[den > 0] / den[den > 0]
    lo, hi = np.percentile(ratios, INTERVAL)
    return float(100.0 * c.sum() / u.sum()), [float(lo), float(hi)]


SCORES = ("gold", "agreement")


def score_of(questions, score: str = "auto") -> str:
    """``gold`` (accuracy against each question's answer) or ``agreement`` (against the unpruned model's
    answer); ``auto`` picks agreement when no question has a gold answer (the photo source's)."""
    from .data.photos import ANSWER

    if score == "auto":
        return "agreement" if all(q.answer == ANSWER for q in questions) else "gold"
    if score not in SCORES:
        raise ValueError(f"score must be auto, gold or agreement; got {score!r}")
    return score


def run_budgets(model, processor, questions, visipruner_cfg: VisiPrunerConfig, methods, budgets=BUDGETS,
                max_new_tokens: int = 6, batch_size: int = 1, unpruned_records=None, on_row=None,
                score: str = "auto") -> list[dict]:
    """One row per (method, budget) plus the unpruned row: accuracy, % retained with its interval,
    agreement with the unpruned answers, average visual fraction per layer, prefill FLOPs ratio.
    ``on_row(rows)`` is called after each row (e.g. to save what a long run has so far). ``score``:
    see ``score_of``; each row says which (``score``)."""
    from .bench import Setting, answer_all, summarise
    from .evaluate import normalize_answer

    score = score_of(questions, score)

    L = model.config.text_config.num_hidden_layers
    unpruned = Setting("unpruned", "budget", None)
    unpruned.records = unpruned_records or answer_all(model, processor, questions, None, max_new_tokens, "unpruned",
                                                      batch_size)
    if score == "agreement":  # the unpruned answers are the reference: each pruned answer right when equal
        reference = [normalize_answer(r["prediction"]) for r in unpruned.records]
        base = [True] * len(reference)

        def right(records):
            return [normalize_answer(r["prediction"]) == a for r, a in zip(records, reference)]
    else:
        base = [r["correct"] for r in unpruned.records]

        def right(records):
            return [r["correct"] for r in records]
    row = summarise(unpruned, None, {})
    row.update(budget=1.0, retained_pct=100.0, retained_ci=[100.0, 100.0], score=score)
    rows = [row]
    if "visipruner" in methods and visipruner_budget_config(visipruner_cfg, 0.5, L) is None:
        print("bench: visipruner has no budget mode in this version (VisiPrunerConfig has no keep_ratio); "
              "left out of --budgets", file=sys.stderr)
    for b in budgets:
        for name, cfg in budget_configs(L, b, visipruner_cfg, methods).items():
            s = Setting(name, "budget", cfg)
            s.records = answer_all(model, processor, questions, cfg, max_new_tokens, f"{name}@{b:g}", batch_size)
            row = summarise(s, unpruned.records, {})
            row["budget"], row["score"] = b, score
            row["retained_pct"], row["retained_ci"] = retained(right(s.records), base)
            rows.append(row)
            if on_row is not None:
                on_row(rows)
    return rows


def print_budget_table(rows: list[dict]) -> None:
    """Methods down, budgets across: % retained ±half-width of the 90% interval (as the field's tables)."""
    budgets = sorted({r["budget"] for r in rows if r["method"] != "unpruned"})
    un = next(r for r in rows if r["method"] == "unpruned")
    if un.get("score") == "agreement":
        print(f"agreement with the unpruned answers, % ({un['n']} questions without gold answers), 90% bootstrap interval")
    else:
        print(f"% of the unpruned accuracy ({un['accuracy']:.3f} on {un['n']} questions), 90% bootstrap interval")
    head = f"{'method':<12}" + "".join(f"{f'{b:.0%} tokens':>18}" for b in budgets)
    print(head)
    print("-" * len(head))
    for m in sorted({r["method"] for r in rows if r["method"] != "unpruned"}):
        cells = []
        for b in budgets:
            r = next((x for x in rows if x["method"] == m and x["budget"] == b), None)
            if r is None:
                cells.append(f"{'-':>18}")
                continue
            lo, hi = r["retained_ci"]
            cells.append(f"{r['retained_pct']:>8.1f} [{lo:5.1f},{hi:5.1f}]")
        print(f"{m:<12}" + "".join(f"{c:>18}" for c in cells))
    blocks = [("average visual tokens per layer (fraction of the prompt's) / prefill FLOPs ratio",
               lambda r: f"{r['avg_visual_fraction']:.3f} / {r['prefill_flops_ratio']:.3f}")]
    if un.get("score") != "agreement":  # gold-scored: agreement is a separate figure (answers kept, right or wrong)
        blocks.append(("agreement with the unpruned answers, %", lambda r: f"{100 * r['agreement']:.1f}"))
    for title, cell in blocks:
        print(title)
        for m in sorted({r["method"] for r in rows if r["method"] != "unpruned"}):
            cells = []
            for b in budgets:
                r = next((x for x in rows if x["method"] == m and x["budget"] == b), None)
                cells.append("-" if r is None else cell(r))
            print(f"{m:<12}" + "".join(f"{c:>18}" for c in cells))


def replot(json_path: str, png_path: str) -> None:
    """The table and plot again from a ``bench --budgets`` JSON (``python -m visipruner.budgets IN.json OUT.png``)."""
    import json

    rows = json.loads(open(json_path).read())
    print_budget_table(rows)
    plot_budgets(rows, png_path)


def _legend_label(method: str, rows: list[dict], slack: float = 0.05) -> str:
    """The method's name, plus the share of visual tokens it actually kept (average per layer) when
    that is off its budget by more than ``slack`` somewhere (VisiPruner keeps every token until
    fusion, PDrop cannot go below its first stage): the plot places points at the budget."""
    kept = [(r["budget"], r["avg_visual_fraction"]) for r in rows if r["method"] == method]
    if not kept or all(abs(k - b) <= slack for b, k in kept):
        return method
    lo, hi = min(k for _, k in kept), max(k for _, k in kept)
    return f"{method} (keeps {lo:.2f}-{hi:.2f})" if hi - lo > 0.005 else f"{method} (keeps {lo:.2f})"


def plot_budgets(rows: list[dict], path: str) -> None:
    """% retained against budget, one line per method, 90% intervals as error bars; methods are
    offset a little along x so their bars do not cover each other, and named in a legend outside
    the axes (no labels on the points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows if r["method"] != "unpruned"})
    budgets = sorted({r["budget"] for r in rows if r["method"] != "unpruned"})
    step = min(np.diff(budgets)) if len(budgets) > 1 else 0.1
    width = 0.5 * step
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    cmap = plt.get_cmap("tab10")
    markers, styles = "osD^v<>pPX*h", ("-", "--", ":", "-.")
    for i, m in enumerate(methods):
        pts = sorted((r["budget"], r["retained_pct"], r["retained_ci"]) for r in rows if r["method"] == m)
        off = (i - (len(methods) - 1) / 2) * width / max(1, len(methods) - 1)
        xs = [100 * (b + off) for b, _, _ in pts]
        ys = [y for _, y, _ in pts]
        err = [[y - ci[0] for _, y, ci in pts], [ci[1] - y for _, y, ci in pts]]
        ax.errorbar(xs, ys, yerr=err, color=cmap(i % 10), marker=markers[i % len(markers)], ms=5, lw=1.2,
                    ls=styles[(i // 10) % len(styles)], capsize=2.5, label=_legend_label(m, rows))
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xticks([100 * b for b in budgets], [f"{b:.0%}" for b in budgets])
    ax.set_xlabel("budget (share of the prompt's visual tokens); a method that keeps more says so in the legend")
    un = next((r for r in rows if r["method"] == "unpruned"), None)
    agreement = un is not None and un.get("score") == "agreement"
    ax.set_ylabel("% agreement with the unpruned answers" if agreement else "% of the unpruned accuracy")
    if un is not None:
        what = "agreement" if agreement else "accuracy retained"
        ax.set_title(f"{what} at fixed budgets ({un['n']} questions; bars: 90% bootstrap intervals)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    replot(sys.argv[1], sys.argv[2])
