"""`visipruner calibrate`: find VisiPruner settings for a model and a stated target.

    visipruner calibrate --data calib.jsonl --target agreement=0.99 --out cfg.json
    visipruner calibrate --data calib.jsonl --target flops=0.4 [--model DIR] [--heldout FILE]

How it stays cheap:
1. *Record* once per calibration example and shallow boundary K: one prefill with the shallow
   stage on and nothing removed, measuring at every layer > K the last token's influence row
   (``cos(o - c_j, o)``, ``||c_j||``, ``||o||``) for every visual token.
2. *Score* thousands of (layer, tokens, exit thresholds, patience) candidates from those records
   alone: the fusion layer, critical set and exit layer each candidate would pick, its prefill
   FLOPs, and a risk proxy, the recorded relative influence it removes
   (sum over layers of ``sum_{j removed} ||c_j|| / ||o||``).
3. *Rerun* only a handful of finalists on the Pareto front (risk vs FLOPs) to measure agreement
   with the unpruned answers and the real FLOPs, pick the one meeting the target, and confirm it
   on held-out examples calibration never saw.

Under shift: ``--data`` / ``--heldout`` take several ``NAME=FILE`` sources; finalists are judged
by their worst source (``--min-pruned`` also asks each source to be pruned), the held-out check is
reported per source, and the search includes fusion fallback layers and budget mode
(``--fallback-layers``, ``--budgets``). See docs/calibrate.md, "Under shift".

Where records cannot stand in for a rerun: after the fusion layer removes tokens, every later
layer's hidden states change, so the recorded cosines used for the exit decision (and the
risk of later layers) come from the unpruned run, not the pruned one. The fusion decision and
critical set are exact (nothing is removed before the fusion layer); the exit layer and risk
are estimates. That is why finalists are rerun, and why the chosen config is confirmed on a
held-out split with the real runtime.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import apply
from .attention import Influence
from .adapters import get_adapter
from .config import VisiPrunerConfig
from .flops import Dims, dense_token_flops, shallow_prefill_pairs
from .inputs import InputError
from .methods.visipruner import VisiPruner


class _Recorder(VisiPruner):
    """Shallow stage as configured; influence measured at every layer > K; nothing removed."""

    def needs_influence(self, layer: int) -> bool:
        return layer > self.config.shallow_layers

    def decide(self, layer: int, influence: Influence | None, present: torch.Tensor):
        if influence is not None:
            self.rows[layer] = (influence.cos.numpy(), influence.norm.numpy(), influence.output_norm)
        return None

    def start(self, layout, num_layers):
        super().start(layout, num_layers)
        self.rows = {}


@dataclass
class Records:
    """Per-example influence rows for one shallow boundary K (E examples, L layers, m tokens)."""

    K: int
    shallow: bool  # shallow stage on in layers < K (off: those layers run dense, K only sets where checks start)
    cos: np.ndarray  # (E, L, m), nan where not measured
    norm: np.ndarray  # (E, L, m)
    onorm: np.ndarray  # (E, L)
    n_tokens: np.ndarray  # (E,) prompt lengths
    n_visual: np.ndarray  # (E,)
    is_visual: list  # per example, list[bool] (for the shallow-stage FLOPs)


@torch.no_grad()
def record(model, prompts, K: int, progress=True, shallow: bool = True) -> Records:
    from tqdm.auto import tqdm

    L = model.config.text_config.num_hidden_layers
    stages = ("shallow", "middle") if shallow else ("middle",)
    method = _Recorder(VisiPrunerConfig(stages=stages, shallow_layers=K))
    rows, lens, nvis, isvis = [], [], [], []
    visual = get_adapter(model).visual_mask
    with apply(model, method):
        for inp in tqdm(prompts, desc=f"record K={K}{'' if shallow else ' (no shallow stage)'}", disable=not progress, file=sys.stderr, leave=False):
            model(**inp, use_cache=False, logits_to_keep=1)
            rows.append(dict(method.rows))
            ids = inp["input_ids"][0]
            v = visual(ids)
            lens.append(int(ids.numel()))
            nvis.append(int(v.sum()))
            isvis.append(v.tolist())
    m = max(nvis)
    E = len(prompts)
    cos = np.full((E, L, m), np.nan, dtype=np.float64)
    norm = np.zeros((E, L, m))
    onorm = np.ones((E, L))
    for e, r in enumerate(rows):
        for layer, (c, nrm, o) in r.items():
            cos[e, layer, : len(c)] = c
            norm[e, layer, : len(nrm)] = nrm
            onorm[e, layer] = max(o, 1e-12)
    return Records(K, shallow, cos, norm, onorm, np.array(lens), np.array(nvis), isvis)


@dataclass
class Candidate:
    config: VisiPrunerConfig
    flops_ratio: float  # predicted, mean over examples
    risk: float  # recorded relative influence removed, mean over examples
    fusion_rate: float  # fraction of examples where fusion triggers


def score_candidates(rec: Records, dims: Dims, layer_thrs, token_thrs, exit_thrs, patiences, relative: bool,
                     fallbacks=(None,), budgets=()):
    """Predicted FLOPs ratio and risk of every candidate, from the records alone (vectorised).

    ``fallbacks``: fusion fallback layers (None: none); ``budgets``: keep ratios scored as budget
    mode (the budget's largest ``||c_j||`` kept at fusion) besides the ``token_thrs``; an ``exit_thrs``
    entry None scores the candidates without the deep stage (no exit; one candidate, not one per
    patience)."""
    E, L, m = rec.cos.shape
    K = rec.K
    per_token = dense_token_flops(dims, 1)
    attn = 2 * dims.q_dim
    # prefill FLOPs per layer as a function of the layer's token count n (plain causal layers)
    def layer_cost(n):
        return n * per_token + attn * 2 * (n * (n + 1) / 2)

    if rec.shallow:
        shallow = np.array([
            sum(per_token * n + attn * sum(shallow_prefill_pairs(v, "merge" if l == 0 else "disable")) for l in range(K))
            for n, v in zip(rec.n_tokens, rec.is_visual)
        ])
    else:
        shallow = np.array([K * layer_cost(float(n)) for n in rec.n_tokens])
    stages = ("shallow", "middle", "deep") if rec.shallow else ("middle", "deep")
    dense = np.array([L * layer_cost(n) for n in rec.n_tokens])
    min_cos = np.nanmin(np.where(np.isnan(rec.cos), np.inf, rec.cos), axis=2)  # (E, L)
    min_cos[:, : K + 1] = np.inf
    score = rec.norm / rec.onorm[..., None] if relative else rec.norm
    rel_infl = rec.norm / rec.onorm[..., None]  # (E, L, m)
    layers = np.arange(L)
    out = []
    rules = [("threshold", tt) for tt in token_thrs] + [("budget", r) for r in budgets]
    for lt, fb in ((lt, fb) for lt in layer_thrs for fb in fallbacks):
        below = min_cos < lt
        fusion = np.where(below.any(axis=1), below.argmax(axis=1), L)  # L = never
        if fb is not None:
            fusion = np.minimum(fusion, fb)
        fused = fusion < L
        at = np.minimum(fusion, L - 1)
        ranks = np.argsort(np.argsort(-rec.norm[np.arange(E), at], axis=1, kind="stable"), axis=1, kind="stable")
        for kind, tt in rules:
            if kind == "threshold":
                S = score[np.arange(E), at] > tt  # (E, m)
            else:  # the budget's most influential tokens (ties: earlier token first, as the runtime)
                k = np.array([VisiPrunerConfig(keep_ratio=tt).budget(int(n)) for n in rec.n_visual])
                S = ranks < k[:, None]
            S &= fused[:, None]
            s_count = S.sum(axis=1)
            cos_S = np.where(S[:, None, :], rec.cos, np.inf)
            min_cos_S = np.nanmin(np.where(np.isnan(cos_S), np.inf, cos_S), axis=2)  # (E, L)
            after = layers[None, :] > fusion[:, None]
            removed_nonS = np.where(~S[:, None, :], rel_infl, 0).sum(axis=2)  # (E, L)
            all_infl = rel_infl.sum(axis=2)
            for et in exit_thrs:  # None: no deep stage (the exit never fires)
                if et is None:
                    hit = np.zeros_like(after)
                else:
                    hit = (min_cos_S >= et) & after & (s_count[:, None] > 0)
                count = np.cumsum(hit, axis=1)
                for p in (patiences if et is not None else patiences[:1]):
                    reach = count >= p
                    exited = reach.any(axis=1)
                    exit_l = np.where(exited, reach.argmax(axis=1), L)
                    n_tok = rec.n_tokens[:, None] - np.where(
                        layers[None] > fusion[:, None], rec.n_visual[:, None] - s_count[:, None], 0
                    ) - np.where(layers[None] > exit_l[:, None], s_count[:, None], 0)
                    costs = layer_cost(n_tok.astype(np.float64))
                    costs[:, :K] = 0
                    last_check = np.minimum(exit_l if et is not None else fusion, L - 1)  # no deep stage: none after fusion
                    checked = (layers[None] > K) & (layers[None] <= last_check[:, None]) & (
                        (s_count[:, None] > 0) | (layers[None] <= fusion[:, None]))
                    present = np.where(layers[None] > fusion[:, None], s_count[:, None], rec.n_visual[:, None])
                    infl = np.where(checked, 4 * dims.q_dim * n_tok + 8 * dims.q_dim * present, 0)
                    flops = costs.sum(axis=1) + shallow + infl.sum(axis=1)
                    risk = np.where(after & (layers[None] <= exit_l[:, None]), removed_nonS, 0).sum(axis=1) + np.where(
                        layers[None] > exit_l[:, None], all_infl, 0).sum(axis=1)
                    budget = dict(keep_ratio=float(tt)) if kind == "budget" else dict(tokens_threshold=float(tt))
                    deep = dict(exit_threshold=float(min(et, 1.0)), exit_patience=int(p)) if et is not None else {}
                    cfg = VisiPrunerConfig(stages=stages if et is not None else tuple(x for x in stages if x != "deep"),
                                           shallow_layers=K, layer_threshold=float(lt), **deep,
                                           relative_tokens_threshold=relative and kind == "threshold",
                                           fusion_fallback_layer=None if fb is None else int(fb), **budget)
                    out.append(Candidate(cfg, float((flops / dense).mean()), float(risk.mean()), float(fused.mean())))
    return out


def pareto_front(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other candidate beats on both FLOPs and risk."""
    front, best = [], float("inf")
    for c in sorted(cands, key=lambda c: (c.flops_ratio, c.risk)):
        if c.risk < best - 1e-12:
            front.append(c)
            best = c.risk
    return front


def _grid(rec: Records, relative: bool):
    mc = np.nanmin(np.where(np.isnan(rec.cos), np.inf, rec.cos), axis=2)[:, rec.K + 1:]
    mc = mc[np.isfinite(mc)]
    layer_thrs = sorted(set(np.round(np.quantile(mc, [0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9]), 6)) | {0.995})
    sc = (rec.norm / rec.onorm[..., None] if relative else rec.norm)[:, rec.K + 1:]
    sc = sc[sc > 0]
    token_thrs = sorted(set(np.round(np.quantile(sc, [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.995]), 8)))
    if not relative:
        token_thrs = sorted(set(token_thrs) | {0.2})
    # and no exit at all: a model may read the image again after layers that look quiet one at a time
    # (the embedded model does at layers 21-24 of 30), which no exit threshold can see coming
    exit_thrs = sorted(set(np.round(np.quantile(mc, [0.5, 0.8, 0.95, 0.99]), 6)) | {0.999, 1.0}) + [None]
    return layer_thrs, token_thrs, exit_thrs, (1, 2)


@torch.no_grad()
def measure(model, processor, prompts, config, reference_answers, max_new_tokens=4, progress=True,
            batch_size: int = 1, sources: list[str] | None = None):
    """Agreement with the unpruned answers, the real prefill FLOPs ratio of a config and the share of
    prompts with an image that it actually pruned (``pruned_rate``); ``batch_size`` prompts per
    generate call (each row pruned as if alone: the same answers as one at a time). ``sources``
    (one name per prompt): the same figures per source too (``by_source``)."""
    from .bench import _gen_kwargs
    from .evaluate import answer_batches, normalize_answer

    ratios, answers, pruned, exits = [], [], [], []
    for _, chunk_answers, stats in answer_batches(model, processor, prompts, config,
                                                  _gen_kwargs(processor, max_new_tokens), batch_size, "rerun", progress):
        answers += chunk_answers
        ratios += [s.prefill_flops_ratio for s in stats if s is not None]
        exits += [s.exit_layer for s in stats if s is not None and s.num_visual_tokens]
        # pruning happened: some layer ran with fewer visual tokens than the prompt has
        pruned += [min(s.visual_tokens_per_layer) < s.num_visual_tokens if s is not None and s.num_visual_tokens
                   else None for s in stats]
    n = len(prompts)
    agree = [normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, reference_answers or [])]
    out = {"agreement": sum(agree) / n if reference_answers else None,
           "flops_ratio": float(np.mean(ratios)) if ratios else 1.0, "answers": answers,
           "pruned_rate": _rate(pruned), **exit_figures(exits)}
    if sources is not None and reference_answers:
        out["by_source"] = {}
        for name in dict.fromkeys(sources):
            rows = [i for i, src in enumerate(sources) if src == name]
            out["by_source"][name] = {
                "examples": len(rows), "agreement": sum(agree[i] for i in rows) / len(rows),
                "flops_ratio": float(np.mean([ratios[i] for i in rows])) if len(ratios) == n else 1.0,
                "pruned_rate": _rate([pruned[i] for i in rows])}
    return out


def exit_figures(exits: list[int | None]) -> dict:
    """Of the prompts with an image: the latest layer their vision exit fired at (None: never) and the
    share where it fired (None: no such prompt)."""
    fired = [e for e in exits if e is not None]
    return {"latest_exit": max(fired, default=None), "exit_rate": len(fired) / len(exits) if exits else None}


def choose_exit_by(finalist: dict, how: str, num_layers: int) -> tuple[int | None, str]:
    """The ``exit_by`` bound for the chosen config and why. ``how``: ``auto`` bounds the exit one layer
    after the latest exit the reruns saw, only where the exit fired on every rerun prompt with an image
    (so the bound changes no decision calibration measured, and the reruns' figures stand); ``none``;
    or a layer number (its effect is measured again). A bound lets a serving engine allocate the
    layers after it for text only (vLLM plugin)."""
    if how == "none":
        return None, "not asked for (--exit-by none)"
    if how != "auto":
        return int(how), "given (--exit-by)"
    if "deep" not in finalist["config"]["stages"]:
        return None, "no deep stage"
    latest, rate = finalist.get("latest_exit"), finalist.get("exit_rate")
    if rate is None or latest is None:
        return None, "the vision exit fired on no rerun prompt"
    if rate < 1.0:
        return None, f"the vision exit fired on {rate:.0%} of the rerun prompts, not all: a bound would change the others"
    if latest + 1 >= num_layers:
        return None, "the latest exit is at the last layer: a bound would free nothing"
    return latest + 1, f"one layer after the latest exit the reruns saw (layer {latest}, on every prompt)"


def parse_exit_by(text: str) -> str:
    if text in ("auto", "none"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"--exit-by takes auto, none or a layer number >= 1; got {text!r}")
    return str(value)


def _rate(flags: list) -> float | None:
    """Share of True among the flags that are not None (prompts with an image); None if none."""
    flags = [f for f in flags if f is not None]
    return float(np.mean(flags)) if flags else None


def parse_target(text: str) -> tuple[str, float]:
    try:
        kind, value = text.split("=")
        value = float(value)
    except ValueError:
        raise InputError(f"--target must look like agreement=0.99 or flops=0.4, got {text!r}") from None
    if kind not in ("agreement", "flops") or not 0 < value <= 1:
        raise InputError(f"--target: kind must be 'agreement' or 'flops' and the value in (0, 1], got {text!r}")
    return kind, value


def parse_variants(text: str) -> list[tuple[int, bool]]:
    """'2,4,6,2:off' -> [(2, True), (4, True), (6, True), (2, False)]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, _, flag = part.partition(":")
        if not k.isdigit() or int(k) < 1 or flag not in ("", "off", "on"):
            raise InputError(f"--shallow-layers: expected K or K:off with K >= 1, got {part!r}")
        out.append((int(k), flag != "off"))
    if not out:
        raise InputError("--shallow-layers: no values given")
    return out


def parse_fallbacks(text: str) -> list[int | None]:
    """'none,6,9' -> [None, 6, 9]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part != "none" and not part.isdigit():
            raise InputError(f"--fallback-layers: expected layer numbers or 'none', got {part!r}")
        out.append(None if part == "none" else int(part))
    if not out:
        raise InputError("--fallback-layers: no values given")
    return out


def parse_budgets(text: str) -> tuple[float, ...]:
    """'0.1,0.2' -> (0.1, 0.2); each in (0, 1]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            value = float(part)
        except ValueError:
            value = -1.0
        if not 0 < value <= 1:
            raise InputError(f"--budgets: expected keep ratios in (0, 1], got {part!r}")
        out.append(value)
    return tuple(out)


def read_sources(specs: list[str], flag: str, limit: int | None):
    """Questions of one or more ``[NAME=]FILE`` specs, and the source name of each question."""
    from . import inputs

    questions, names = [], []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        qs = inputs.read_questions(path, flag, limit=limit)
        questions += qs
        names += [name] * len(qs)
    return questions, names


def _margin(f: dict) -> float:
    """One standard error of a measured agreement (binomial, over the rerun examples), with the
    rate smoothed by one agreement and one disagreement: 15 of 15 is not a certainty (unsmoothed,
    its error would be 0 and the margin would vanish exactly where the sample is smallest)."""
    n = max(1, f["examples"])
    a = (f["agreement"] * n + 1) / (n + 2)
    return math.sqrt(a * (1 - a) / n)


def _worst(f: dict, margin: bool) -> float:
    """The finalist's agreement on its worst source (less one standard error there with ``margin``):
    a config for several sources must hold on each, not on their average."""
    parts = list(f.get("by_source", {}).values()) or [f]
    return min(p["agreement"] - (_margin(p) if margin else 0.0) for p in parts)


def family(config: dict) -> str:
    """A candidate's front: 'budget' (keep_ratio), 'relative' or 'absolute' token threshold."""
    if config.get("keep_ratio") is not None or config.get("keep_tokens") is not None:
        return "budget"
    return "relative" if config["relative_tokens_threshold"] else "absolute"


def _least_pruned(f: dict) -> float:
    """The finalist's pruning rate on its least pruned source (1.0 when not measured)."""
    parts = list(f.get("by_source", {}).values()) or [f]
    rates = [p.get("pruned_rate") for p in parts]
    return min((r for r in rates if r is not None), default=1.0)


def choose(finalists: list[dict], target: tuple[str, float], margin: bool = True, min_pruned: float = 0.0) -> dict:
    """The finalist that meets the target most cheaply (agreement) or agrees most (flops).

    For an agreement target, ``margin`` asks the agreement to clear the target by one standard
    error, so that the choice still meets it on examples calibration never saw; when no finalist
    does, the cheapest one meeting the bare target is taken, then the most agreeing one.
    With several calibration sources every agreement here is the worst source's. ``min_pruned``:
    only finalists that prune at least that share of the prompts of every source (when any does).
    """
    kind, value = target
    finalists = [f for f in finalists if _least_pruned(f) >= min_pruned] or finalists
    if kind == "agreement":
        safe = [f for f in finalists if _worst(f, margin) >= value]
        ok = safe or [f for f in finalists if _worst(f, False) >= value]
        return min(ok, key=lambda f: f["flops_ratio"]) if ok else max(finalists, key=lambda f: _worst(f, False))
    ok = [f for f in finalists if f["flops_ratio"] <= value]
    return (max(ok, key=lambda f: (_worst(f, False), -f["flops_ratio"])) if ok
            else min(finalists, key=lambda f: f["flops_ratio"]))


def _nearest(front: list[Candidate], targets, exclude=()) -> list[Candidate]:
    """For each target FLOPs ratio, the front point predicted nearest to it (each point once)."""
    out, used = [], set(exclude)
    for t in targets:
        pts = [c for c in front if id(c) not in used]
        if not pts:
            break
        c = min(pts, key=lambda c: abs(c.flops_ratio - t))
        used.add(id(c))
        out.append(c)
    return out


def default_variants(num_layers: int) -> list[tuple[int, bool]]:
    """(K, shallow stage on) pairs searched by default: K = 2 and 4 of 32 scaled to depth, and
    the middle/deep stages alone, checked from 2 of 32 on. (The paper's 6 of 32 is one
    ``--shallow-layers`` away; each variant costs one prefill per calibration example.)"""
    ks = sorted({max(1, round(k * num_layers / 32)) for k in (2, 4)})
    return [(k, True) for k in ks] + [(ks[0], False)]


def default_fallbacks(num_layers: int, K: int) -> list[int | None]:
    """Fusion fallback layers searched by default: none, and 6 / 9 / 12 / 16 of 32 scaled to depth
    (those past K): fusion is guaranteed by then on inputs whose influence never crosses the layer
    threshold (photos for a model calibrated on drawings)."""
    return [None] + sorted({round(x * num_layers / 32) for x in (6, 9, 12, 16)} - set(range(K + 1)))


DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.5)


def calibrate(model, processor, calib_questions, target, heldout_questions=None, shallow_layers=None,
              finalists: int = 3, rerun_limit: int | None = 60, progress=True, variants=None,
              refine: int = 1, margin: bool = True, refine_points: int = 1, batch_size: int = 1,
              sources: list[str] | None = None, heldout_sources: list[str] | None = None,
              fallbacks=None, budgets=DEFAULT_BUDGETS, min_pruned: float = 0.0, exit_by: str = "auto") -> dict:
    """Record, score, rerun finalists (then ``refine`` more rounds around the target), confirm.

    ``variants``: (K, shallow-stage-on) pairs to record; ``shallow_layers`` (a list of K, shallow
    stage on) is the older spelling. Default: ``default_variants(depth)``. ``sources`` /
    ``heldout_sources``: a source name per question (e.g. its file); finalists are then judged by
    their worst source's agreement, and the held-out check is reported per source.
    ``fallbacks``: fusion fallback layers to search (default ``default_fallbacks``; ``[None]``: none);
    ``budgets``: keep ratios searched in budget mode (``()``: none). ``min_pruned``: the chosen
    config must prune at least this share of each source's prompts in the reruns (see ``choose``).
    ``exit_by``: the chosen config's bound on the vision exit (``choose_exit_by``: auto, none or a layer).
    """
    from .bench import _inputs

    t_start = time.perf_counter()
    L = model.config.text_config.num_hidden_layers
    dims = Dims.from_config(model.config.text_config)
    if variants is None:
        variants = [(k, True) for k in shallow_layers] if shallow_layers else default_variants(L)
    prompts = [_inputs(processor, q, model) for q in calib_questions]
    cands = []
    for K, shallow in variants:
        rec = record(model, prompts, K, progress, shallow=shallow)
        fb = default_fallbacks(L, K) if fallbacks is None else [f for f in fallbacks if f is None or f > K]
        for relative in (False, True):
            cands += score_candidates(rec, dims, *_grid(rec, relative), relative=relative, fallbacks=fb,
                                      budgets=() if relative else budgets)
    names = ("absolute", "relative", "budget")
    fronts = {name: pareto_front([c for c in cands if family(c.config.to_dict()) == name]) for name in names}
    # reruns use an evenly strided subset (the whole set with rerun_limit 0/None), so every part of
    # a calibration file made of blocks (one data set after another) is represented
    idx = (np.unique(np.linspace(0, len(prompts) - 1, rerun_limit).round().astype(int))
           if rerun_limit and rerun_limit < len(prompts) else np.arange(len(prompts)))
    rerun_q = [calib_questions[i] for i in idx]
    rerun_p = [prompts[i] for i in idx]
    rerun_s = [sources[i] for i in idx] if sources else None
    unpruned = measure(model, processor, rerun_p, None, None, progress=progress,
                       batch_size=batch_size)["answers"]
    results, done = [], set()

    def rerun(batch, round_):
        for c in batch:
            key = c.config.to_json()
            if key in done:
                continue
            done.add(key)
            m = measure(model, processor, rerun_p, c.config, unpruned, progress=progress,
                        batch_size=batch_size, sources=rerun_s)
            results.append({"config": c.config.to_dict(), "predicted_flops_ratio": c.flops_ratio, "risk": c.risk,
                            "fusion_rate": c.fusion_rate, "agreement": m["agreement"], "flops_ratio": m["flops_ratio"],
                            "pruned_rate": m["pruned_rate"], "latest_exit": m["latest_exit"],
                            "exit_rate": m["exit_rate"], "examples": len(rerun_q), "round": round_,
                            **({"by_source": m["by_source"]} if "by_source" in m else {})})

    # round 0: finalists spread evenly in predicted FLOPs along each threshold family's front (for a
    # FLOPs target, over the part of it from 0.8x the target up to the target: nothing above can win)
    kind, value = target

    def spread(front):
        lo, hi = front[0].flops_ratio, front[-1].flops_ratio
        if kind == "flops":
            lo, hi = max(lo, 0.8 * value), max(min(hi, 0.98 * value), lo)
        return np.linspace(lo, hi, finalists)

    rerun([c for front in fronts.values() if front for c in _nearest(front, spread(front))], 0)
    # refinement: more front points where the target is crossed (agreement) or just under it (FLOPs)
    for r in range(1, refine + 1):
        batch = []
        for name, front in fronts.items():
            mine = [f for f in results if family(f["config"]) == name]
            if not mine:
                continue
            if kind == "agreement":  # bisect between the cheapest pass and the dearest fail below it
                passing = [f for f in mine if _worst(f, False) >= value]
                hi = min((f["predicted_flops_ratio"] for f in passing), default=front[-1].flops_ratio)
                lo = max((f["predicted_flops_ratio"] for f in mine if _worst(f, False) < value
                          and f["predicted_flops_ratio"] < hi), default=front[0].flops_ratio)
                targets = np.linspace(lo, hi, refine_points + 2)[1:-1]
            else:  # agreement grows with FLOPs: look just under the target
                targets = [value * (0.98 - 0.08 * i) for i in range(refine_points)]
            tried = [c for c in front if c.config.to_json() in done]
            batch += [c for c in _nearest(front, targets, exclude=[id(c) for c in tried])
                      if c.flops_ratio <= value * 1.02 or kind == "agreement"]
        if not batch:
            break
        rerun(batch, r)
    chosen = dict(choose(results, target, margin, min_pruned))
    bound, why = choose_exit_by(chosen, exit_by, L)
    chosen["exit_by_reason"] = why
    if bound is not None:
        chosen["config"] = {**chosen["config"], "exit_by": bound}
        if exit_by != "auto":  # a given bound may change decisions: measured again
            m = measure(model, processor, rerun_p, VisiPrunerConfig.from_dict(chosen["config"]), unpruned,
                        progress=progress, batch_size=batch_size, sources=rerun_s)
            chosen.update({k: m[k] for k in ("agreement", "flops_ratio", "pruned_rate", "latest_exit", "exit_rate")})
            if "by_source" in m:
                chosen["by_source"] = m["by_source"]
    out = {
        "target": {"kind": target[0], "value": target[1]},
        "variants": [{"shallow_layers": k, "shallow_stage": sh} for k, sh in variants],
        "candidates_scored": len(cands),
        "front": {name: [
            {"config": c.config.to_dict(), "predicted_flops_ratio": c.flops_ratio, "risk": c.risk,
             "fusion_rate": c.fusion_rate} for c in front] for name, front in fronts.items()},
        "finalists": results,
        "chosen": chosen,
        "calibration_examples": len(calib_questions),
        "rerun_examples": len(rerun_q),
        "search_seconds": time.perf_counter() - t_start,
    }
    if heldout_questions:
        hp = [_inputs(processor, q, model) for q in heldout_questions]
        ref = measure(model, processor, hp, None, None, progress=progress,
                      batch_size=batch_size)["answers"]
        cfg = VisiPrunerConfig.from_dict(chosen["config"])
        m = measure(model, processor, hp, cfg, ref, progress=progress,
                    batch_size=batch_size, sources=heldout_sources)
        meets = lambda r: (r["agreement"] >= target[1]) if target[0] == "agreement" else (r["flops_ratio"] <= target[1])  # noqa: E731
        out["heldout"] = {"examples": len(heldout_questions), "agreement": m["agreement"],
                          "flops_ratio": m["flops_ratio"], "pruned_rate": m["pruned_rate"],
                          "meets_target": meets(m) and all(meets(r) for r in m.get("by_source", {}).values()),
                          "seconds": time.perf_counter() - t_start - out["search_seconds"]}
        if "by_source" in m:
            out["heldout"]["by_source"] = m["by_source"]
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, front in result["front"].items():
        a1.plot([c["predicted_flops_ratio"] for c in front], [c["risk"] for c in front], "o-", ms=3, label=name)
    a1.set_xlabel("predicted prefill FLOPs / unpruned")
    a1.set_ylabel("recorded influence removed (risk)")
    a1.set_title("Pareto front from records", fontsize=9)
    a1.legend(fontsize=8)
    style = {"absolute": ("o", "C0"), "relative": ("s", "C1"), "budget": ("^", "C2")}
    for f in result["finalists"]:
        marker, color = style[family(f["config"])]
        a2.scatter(f["flops_ratio"], f["agreement"], marker=marker, color=color)
    c = result["chosen"]
    a2.scatter(c["flops_ratio"], c["agreement"], s=150, facecolors="none", edgecolors="red", label="chosen")
    if "heldout" in result:
        h = result["heldout"]
        a2.scatter(h["flops_ratio"], h["agreement"], marker="*", s=150, color="red", label="held-out")
    a2.set_xlabel("prefill FLOPs / unpruned (rerun)")
    a2.set_ylabel("agreement with unpruned answers")
    a2.set_title("finalists rerun (o absolute, s relative threshold, ^ budget)", fontsize=9)
    a2.legend(fontsize=8)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run(args) -> int:
    from . import inputs
    from .bench import _load_model

    target = parse_target(args.target)
    variants = parse_variants(args.shallow_layers) if args.shallow_layers is not None else None
    for flag, value, low in (("--limit", args.limit, 1), ("--heldout-limit", args.heldout_limit, 1),
                             ("--finalists", args.finalists, 1), ("--refine", args.refine, 0),
                             ("--refine-points", args.refine_points, 1), ("--rerun-limit", args.rerun_limit, 0),
                             ("--batch-size", args.batch_size, 1)):
        inputs.at_least(flag, value, low)
    if args.heldout_limit is not None and not args.heldout:
        raise inputs.InputError("--heldout-limit needs --heldout")
    fallbacks = parse_fallbacks(args.fallback_layers) if args.fallback_layers is not None else None
    budgets = parse_budgets(args.budgets)
    if not 0 <= args.min_pruned <= 1:
        raise inputs.InputError(f"--min-pruned must be in [0, 1], got {args.min_pruned}")
    inputs.model_dir("--model", args.model)
    inputs.output_file("--out", args.out)
    inputs.output_file("--json", args.json)
    questions, sources = read_sources(args.data, "--data", args.limit)
    heldout, heldout_sources = read_sources(args.heldout, "--heldout", args.heldout_limit) if args.heldout else (None, None)
    model, processor = _load_model(args)
    L = model.config.text_config.num_hidden_layers
    if variants and max(k for k, _ in variants) >= L:
        raise InputError(f"--shallow-layers: K must be below the model's {L} layers, got {args.shallow_layers!r}")
    if fallbacks and max((f for f in fallbacks if f is not None), default=0) >= L:
        raise InputError(f"--fallback-layers: layers must be below the model's {L} layers, got {args.fallback_layers!r}")
    result = calibrate(model, processor, questions, target, heldout, finalists=args.finalists,
                       rerun_limit=args.rerun_limit, variants=variants, refine=args.refine,
                       margin=not args.no_margin, refine_points=args.refine_points, batch_size=args.batch_size,
                       sources=sources if len(args.data) > 1 else None,
                       heldout_sources=heldout_sources if args.heldout and len(args.heldout) > 1 else None,
                       fallbacks=fallbacks, budgets=budgets, min_pruned=args.min_pruned,
                       exit_by=parse_exit_by(args.exit_by))
    print(f"scored {result['candidates_scored']} candidates from records; reran {len(result['finalists'])} finalists "
          f"on {result['rerun_examples']} examples; search took {result['search_seconds'] / 60:.1f} min")
    print(f"{'front':<10}{'K':>5}{'layer':>9}{'tokens':>11}{'fallback':>9}{'exit':>9}{'pat':>4}{'pred FLOPs':>11}"
          f"{'FLOPs':>7}{'agree':>7}{'worst':>7}{'pruned':>7}")
    for f in result["finalists"]:
        c = f["config"]
        k = f"{c['shallow_layers']}{'' if 'shallow' in c['stages'] else '-'}"
        tokens = f"keep {c['keep_ratio']:.2f}" if c.get("keep_ratio") is not None else f"{c['tokens_threshold']:.5f}"
        fb = "-" if c.get("fusion_fallback_layer") is None else str(c["fusion_fallback_layer"])
        ex, pat = (f"{c['exit_threshold']:.5f}", str(c["exit_patience"])) if "deep" in c["stages"] else ("none", "-")
        print(f"{family(c):<10}{k:>5}{c['layer_threshold']:>9.5f}{tokens:>11}{fb:>9}{ex:>9}"
              f"{pat:>4}{f['predicted_flops_ratio']:>11.3f}{f['flops_ratio']:>7.3f}{f['agreement']:>7.3f}"
              f"{_worst(f, False):>7.3f}{f['pruned_rate'] if f['pruned_rate'] is not None else float('nan'):>7.2f}")
    ch = result["chosen"]
    print(f"chosen: FLOPs {ch['flops_ratio']:.3f}, agreement {ch['agreement']:.3f} on calibration; "
          f"exit_by {ch['config'].get('exit_by')} ({ch['exit_by_reason']})")
    if "heldout" in result:
        h = result["heldout"]
        print(f"held-out ({h['examples']} examples): agreement {h['agreement']:.3f}, FLOPs {h['flops_ratio']:.3f}, "
              f"pruned {h['pruned_rate']:.0%}, target {'met' if h['meets_target'] else 'NOT met'} "
              f"({h['seconds'] / 60:.1f} min)")
        for name, r in h.get("by_source", {}).items():
            print(f"  {name}: {r['examples']} examples, agreement {r['agreement']:.3f}, FLOPs {r['flops_ratio']:.3f}, "
                  f"pruned {r['pruned_rate']:.0%}")
    cfg = VisiPrunerConfig.from_dict(ch["config"])
    for path in (args.out, args.json):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.out:
        Path(args.out).write_text(cfg.to_json(indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        plot(result, str(Path(args.json).with_suffix(".png")))
        print(f"wrote {args.json} and {Path(args.json).with_suffix('.png')}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calibrate", help="find VisiPruner thresholds for a model and a target",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, action="append",
                   help="calibration question file (JSONL); repeat for several sources (NAME=FILE names one): "
                   "the choice must then hold on each source")
    p.add_argument("--target", required=True, help="agreement=0.99 (at least) or flops=0.4 (at most, vs unpruned)")
    p.add_argument("--model", help="a saved Llava directory (default: the embedded model)")
    p.add_argument("--heldout", action="append",
                   help="question file the chosen config is confirmed on; repeat (NAME=FILE) for a report per source")
    p.add_argument("--limit", type=int, help="use the first N calibration examples of each --data file")
    p.add_argument("--heldout-limit", type=int)
    p.add_argument("--shallow-layers", help="comma-separated K values to search; 'K:off' records K without the shallow "
                   "stage (default: 2 and 4 of 32 scaled to depth, and 2:off)")
    p.add_argument("--fallback-layers", help="fusion fallback layers to search, comma-separated, 'none' for no "
                   "fallback (default: none and 6, 9, 12, 16 of 32 scaled to depth)")
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                   help="keep ratios searched in budget mode, comma-separated ('' for none)")
    p.add_argument("--min-pruned", type=float, default=0.0,
                   help="choose only a config that prunes at least this share of each source's prompts (e.g. 0.9)")
    p.add_argument("--exit-by", default="auto",
                   help="bound on the vision exit in the chosen config (layers from it hold no visual token, so the "
                   "vLLM plugin allocates their KV cache for text only): auto (one layer after the latest exit seen, "
                   "when the exit fired on every rerun prompt), none, or a layer number (measured again)")
    p.add_argument("--finalists", type=int, default=3, help="first-round finalists rerun per threshold family")
    p.add_argument("--refine", type=int, default=1, help="refinement rounds around the target")
    p.add_argument("--refine-points", type=int, default=1, help="finalists added per threshold family per round")
    p.add_argument("--no-margin", action="store_true",
                   help="agreement target: accept a finalist at the bare target (default: one standard error above)")
    p.add_argument("--rerun-limit", type=int, default=60,
                   help="rerun finalists on N calibration examples, evenly strided (default 60; 0: all)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="prompts per generate call in reruns (each row pruned as if alone)")
    p.add_argument("--out", help="write the chosen config here (VisiPrunerConfig JSON)")
    p.add_argument("--json", help="write the front, finalists and confirmation here (+ a PNG)")
    p.set_defaults(func=_run)
    return p
