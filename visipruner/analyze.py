"""`visipruner analyze`: where does vision matter in a model, and do VisiPruner's stages appear?

    visipruner analyze --data questions.jsonl --out analysis/ [--model DIR] [--limit 24]
                       [--window W] [--config CFG.json]

Writes ``analysis.json`` (every number), PNG plots, ``report.html`` (one self-contained page,
images embedded) and ``suggested_config.json``. Measurements, per example:

1. layer-window knockout: text queries after the first visual token get probability 0 on
   every visual key in a window of ``W`` layers (masked before the softmax: true blocking, the
   rest renormalises), sliding over depth;
2. sink test of the shallow stage (layers ``0..K-1``): block the top-k attended visual tokens,
   k random other visual tokens, all visual tokens, or run VisiPruner's shallow stage;
3. influence (``min_j cos(o - c_j, o)``, tokens over the critical threshold) per layer with the
   shallow stage on, and the fusion/exit layers the config detects;
4. logit lens of the last token (residual stream and the attention output after ``o_proj``);
5. L1 norms of value vectors, sink tokens vs other visual tokens;
6. heatmaps over the image grid (last-token attention, ``||c_j||``) with the critical tokens;
7. attribution: at the fusion layer, noise on / removal of the critical tokens vs keeping only
   them vs removing as many random other visual tokens;
8. the stage boundaries these suggest, as a VisiPrunerConfig;

and a verdict per stage (APPEARS, DOES NOT APPEAR, INCONCLUSIVE) from 95% bootstrap intervals
over examples against the tolerance (see ``verdicts``).

Effects are measured on the answer's first token, teacher-forced at the last prompt position:
``log p`` of the unpruned model's greedy first token, and accuracy = the greedy first token
equals the gold answer's first token (a first-token proxy, not full-answer accuracy).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import json
import math
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters import ADAPTERS, get_adapter
from .attention import Influence
from .config import VisiPrunerConfig
from .inputs import InputError
from .methods.base import Schedule
from .methods.visipruner import VisiPruner
from .runtime import apply

NEG_INF = float("-inf")


@dataclass
class Example:
    """One prompt, ready for the model: ``inputs`` holds input_ids, pixel_values, attention_mask."""

    inputs: dict
    gold_id: int | None = None  # first token of the gold answer (accuracy); None: not scored
    gold_answer: str | None = None
    image: Any = None  # PIL image for the heatmaps (optional)
    id: str = ""
    unpruned_answer: str | None = None  # generated answer of the unpruned model (optional)


# ------------------------------------------------------------------------------ interventions
def _adapter(model):
    """The model's adapter, also while a visipruner handle is applied (which renames the attention)."""
    name = type(model).__name__
    return ADAPTERS[name](model) if name in ADAPTERS else get_adapter(model)


@contextmanager
def block_attention(model, layers, queries: torch.Tensor, keys: torch.Tensor):
    """In ``layers``, the query rows ``queries`` (bool, n) get no attention on keys ``keys`` (bool, n).

    Done by replacing the additive mask each decoder layer receives (causal + -inf on the
    blocked pairs): the softmax renormalises over the remaining keys (true blocking). Works for
    SDPA and eager attention. Every blocked row must keep at least one key.
    """
    adapter = _adapter(model)
    layers = sorted({int(l) for l in layers})
    blocked = queries[:, None] & keys[None, :]

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        n = hidden.shape[1]
        m = kwargs.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.dim() == 4:
            base = m[:, :, -n:, -n:]
            if base.dtype == torch.bool:
                base = torch.zeros(base.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(~base, NEG_INF)
            else:
                base = base.to(hidden.dtype).clone()
        else:
            base = torch.full((n, n), NEG_INF, dtype=hidden.dtype, device=hidden.device).triu(1)[None, None]
        kwargs["attention_mask"] = base.masked_fill(blocked.to(hidden.device), NEG_INF)
        return args, kwargs

    handles = [adapter.layers[l].register_forward_pre_hook(hook, with_kwargs=True) for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def noise_rows(model, layer: int, positions: list[int], seed: int = 0):
    """Replace the hidden states entering decoder ``layer`` at ``positions`` by Gaussian noise of the same L2 norm."""
    adapter = _adapter(model)
    g = torch.Generator().manual_seed(seed)

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = hidden.clone()
        pos = torch.tensor(positions, dtype=torch.long, device=hidden.device)
        rows = hidden[0, pos]
        noise = torch.randn(rows.shape, generator=g).to(rows)
        noise = noise * (rows.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        hidden[0, pos] = noise
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    h = adapter.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


def text_queries(input_ids: torch.Tensor, visual_token_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(text queries after the first visual token, visual positions), bool masks of the prompt.
    ``visual_token_ids``: one id or several (image and video tokens)."""
    is_vis = torch.isin(input_ids[0], torch.as_tensor(visual_token_ids, device=input_ids.device))
    idx = is_vis.nonzero().squeeze(-1)
    after = torch.arange(is_vis.numel(), device=is_vis.device) > int(idx[0])
    return (~is_vis) & after, is_vis


@torch.no_grad()
def answer_logprob(model, inputs: dict, answer_id: int) -> tuple[float, int]:
    """(log p(answer_id) at the last prompt position, greedy token there)."""
    out = model(**inputs, use_cache=False, logits_to_keep=1)
    lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    return float(lp[answer_id]), int(lp.argmax())


class _Recorder(VisiPruner):
    """Influence of the last token at every layer >= ``first``; nothing removed."""

    def __init__(self, config: VisiPrunerConfig, first: int):
        super().__init__(config)
        self.first = first
        self.rows: dict[int, Influence] = {}

    def start(self, layout, num_layers):
        super().start(layout, num_layers)
        self.rows = {}

    def needs_influence(self, layer: int) -> bool:
        return layer >= self.first

    def decide(self, layer, influence, present):
        if influence is not None:
            self.rows[layer] = influence


@torch.no_grad()
def record_influence(model, inputs: dict, config: VisiPrunerConfig, shallow: bool) -> dict[int, Influence]:
    """Per-layer influence rows. ``shallow=False``: the unmodified model, every layer.
    ``shallow=True``: the config's shallow stage on, layers > K (what VisiPruner's checks see)."""
    K = config.shallow_layers
    if shallow:
        rec = _Recorder(dataclasses.replace(config, stages=("shallow", "middle")), K + 1)
    else:
        rec = _Recorder(dataclasses.replace(config, stages=("middle",)), 0)
    with apply(model, rec):
        model(**inputs, use_cache=False, logits_to_keep=1)
    return dict(rec.rows)


@torch.no_grad()
def baseline_probe(model, inputs: dict, topk: int = 5):
    """One unmodified forward with hooks: answer logits, logit lens, value-output lens, v L1 norms.

    Returns dict: ``logprobs`` (V,), ``lens`` (L, V) log-softmax of final-norm + lm_head on each
    layer's output residual at the last token, ``attn_lens`` (L, V) the same for the layer's
    attention output after o_proj, ``v_l1`` (L, n) L1 norm of each token's value vector.
    """
    adapter = _adapter(model)
    L = len(adapter.layers)
    resid, attn_out, v_l1 = [None] * L, [None] * L, [None] * L
    handles = []

    def grab(store, i, last=True, l1=False):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            store[i] = h[0].abs().float().sum(-1) if l1 else h[0, -1].float()
        return hook

    for i, layer in enumerate(adapter.layers):
        handles.append(layer.register_forward_hook(grab(resid, i)))
        handles.append(layer.self_attn.o_proj.register_forward_hook(grab(attn_out, i)))
        handles.append(layer.self_attn.v_proj.register_forward_hook(grab(v_l1, i, l1=True)))
    try:
        out = model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    norm, head = adapter.language_model.norm, model.get_output_embeddings()
    w = head.weight

    def lens(rows):
        x = torch.stack(rows).to(w.dtype)
        return torch.log_softmax(head(norm(x)).float(), dim=-1)

    return {
        "logprobs": torch.log_softmax(out.logits[0, -1].float(), dim=-1),
        "lens": lens(resid),
        "attn_lens": lens(attn_out),
        "v_l1": torch.stack(v_l1),
    }


# --------------------------------------------------------------------------------- per example
def _stats(values) -> dict:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if v.size == 0:
        return {"n": 0, "mean": None, "median": None, "q25": None, "q75": None}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "q25": float(np.quantile(v, 0.25)), "q75": float(np.quantile(v, 0.75))}


def windows(num_layers: int, window: int, stride: int = 1) -> list[tuple[int, int]]:
    """[start, end) windows of ``window`` layers sliding over depth (the last one ends at L)."""
    window = max(1, min(window, num_layers))
    starts = list(range(0, num_layers - window + 1, max(1, stride)))
    if starts[-1] != num_layers - window:
        starts.append(num_layers - window)
    return [(s, s + window) for s in starts]


def prefix_sizes(num_layers: int, window: int) -> list[int]:
    """Prefix lengths j (layers 0..j-1 knocked out together) tested for the shallow boundary."""
    return sorted({j for j in [1, 2, *range(window, num_layers, max(1, window))] if 1 <= j < num_layers})


def _critical_scores(inf: Influence, cfg: VisiPrunerConfig) -> torch.Tensor:
    return inf.norm / max(inf.output_norm, 1e-12) if cfg.relative_tokens_threshold else inf.norm


@torch.no_grad()
def analyze_example(model, ex: Example, cfg: VisiPrunerConfig, window: int, *, stride: int = 1,
                    sinks: int = 4, topk: int = 5, heat_layers=(), seed: int = 0,
                    tick: Callable[[], None] | None = None) -> dict:
    """Every measurement for one prompt (a JSON-ready dict). ``ex.inputs`` must be batch 1.

    ``tick`` is called after each forward pass (progress bars).
    """
    tick = tick or (lambda: None)
    adapter = get_adapter(model)
    L = len(adapter.layers)
    K = cfg.shallow_layers
    inputs = ex.inputs
    ids = inputs["input_ids"]
    tq, is_vis = text_queries(ids, list(adapter.visual_token_ids.values()))
    vis_pos = is_vis.nonzero().squeeze(-1)
    m = int(vis_pos.numel())
    rng = np.random.default_rng(seed)

    base = baseline_probe(model, inputs, topk)
    tick()
    answer_id = int(base["logprobs"].argmax())
    lp0 = float(base["logprobs"][answer_id])
    res: dict[str, Any] = {"id": ex.id, "answer_id": answer_id, "gold_id": ex.gold_id, "gold_answer": ex.gold_answer,
                           "unpruned_answer": ex.unpruned_answer, "num_visual": m, "prompt_length": int(ids.shape[1]),
                           "logp_unpruned": lp0}

    def effect(lp_top):
        tick()
        lp, top = lp_top
        return {"logp": lp, "delta_logp": lp - lp0, "top": top, "same_top": top == answer_id,
                "correct": None if ex.gold_id is None else top == ex.gold_id}

    res["unpruned"] = {"logp": lp0, "delta_logp": 0.0, "top": answer_id, "same_top": True,
                       "correct": None if ex.gold_id is None else answer_id == ex.gold_id}

    # 1. knockout windows
    ko = []
    for s, e in windows(L, window, stride):
        with block_attention(model, range(s, e), tq, is_vis):
            ko.append({"start": s, "end": e, **effect(answer_logprob(model, inputs, answer_id))})
    res["knockout"] = ko
    with block_attention(model, range(L), tq, is_vis):
        res["knockout_all"] = effect(answer_logprob(model, inputs, answer_id))
    # prefixes 0..j-1 blocked together: the largest harmless j is a candidate shallow boundary K
    pre = []
    for j in prefix_sizes(L, window):
        with block_attention(model, range(j), tq, is_vis):
            pre.append({"layers": j, **effect(answer_logprob(model, inputs, answer_id))})
    res["knockout_prefix"] = pre

    # influence rows: unmodified model (all layers) and with the shallow stage (layers > K)
    plain = record_influence(model, inputs, cfg, shallow=False)
    tick()
    attn = torch.stack([plain[l].attention for l in range(L)])  # (L, m), mean over heads
    cnorm = torch.stack([plain[l].norm for l in range(L)])
    shallow_attn = attn[:K].mean(0)
    k = max(1, min(sinks, m))
    sink_ids = shallow_attn.argsort(descending=True, stable=True)[:k]
    res["sink_tokens"] = sink_ids.tolist()
    res["sink_attention_share"] = float(shallow_attn[sink_ids].sum() / shallow_attn.sum().clamp_min(1e-12))
    res["visual_attention_per_layer"] = attn.sum(1).tolist()  # head-mean attention mass on all visual keys

    # 2. sink test in layers 0..K-1
    sink_mask = torch.zeros_like(is_vis)
    sink_mask[vis_pos[sink_ids]] = True
    others = [int(i) for i in range(m) if i not in set(sink_ids.tolist())]
    rand_mask = torch.zeros_like(is_vis)
    if others:
        pick = rng.choice(others, size=min(k, len(others)), replace=False)
        rand_mask[vis_pos[torch.as_tensor(pick, dtype=torch.long)]] = True
    sink = {}
    with block_attention(model, range(K), tq, sink_mask):
        sink["block_topk_sinks"] = effect(answer_logprob(model, inputs, answer_id))
    with block_attention(model, range(K), tq, rand_mask):
        sink["block_k_random_others"] = effect(answer_logprob(model, inputs, answer_id))
    with block_attention(model, range(K), tq, is_vis):
        sink["block_all_visual"] = effect(answer_logprob(model, inputs, answer_id))
    shallow_cfg = VisiPrunerConfig(stages=("shallow",), shallow_layers=K, shallow_renormalise=cfg.shallow_renormalise)
    with apply(model, shallow_cfg):
        sink["visipruner_merge"] = effect(answer_logprob(model, inputs, answer_id))
    res["sink_test"] = sink

    # 3. influence with the shallow stage on, and what the config detects
    rec = record_influence(model, inputs, cfg, shallow=True)
    tick()
    res["min_cos"] = [rec[l].min_cos if l in rec else None for l in range(L)]
    res["tokens_over_threshold"] = [int((_critical_scores(rec[l], cfg) > cfg.tokens_threshold).sum()) if l in rec else None
                                    for l in range(L)]
    res["output_norm"] = [rec[l].output_norm if l in rec else None for l in range(L)]
    res["max_token_norm"] = [float(rec[l].norm.max()) if l in rec else None for l in range(L)]
    with apply(model, cfg) as h:
        full = effect(answer_logprob(model, inputs, answer_id))
    st = h.last_stats
    res["config_run"] = {**full, "fusion_layer": st.fusion_layer, "exit_layer": st.exit_layer,
                         "critical_tokens": list(st.critical_tokens), "prefill_flops_ratio": st.prefill_flops_ratio,
                         "avg_visual_tokens": st.avg_visual_tokens}

    # 4. logit lens
    lens, alens = base["lens"], base["attn_lens"]

    def rank(lp):
        return (lp > lp[:, answer_id : answer_id + 1]).sum(-1).tolist()

    res["logit_lens"] = {
        "residual_logp": lens[:, answer_id].tolist(), "residual_rank": rank(lens),
        "residual_top": lens.topk(topk, dim=-1).indices.tolist(),
        "attn_output_logp": alens[:, answer_id].tolist(), "attn_output_rank": rank(alens),
        "attn_output_top": alens.topk(topk, dim=-1).indices.tolist(),
    }

    # 5. value L1 norms
    v = base["v_l1"][:, vis_pos]  # (L, m)
    first = torch.zeros(m, dtype=torch.bool)
    first[0] = True
    sink_sel = torch.zeros(m, dtype=torch.bool)
    sink_sel[sink_ids] = True
    rest = ~(sink_sel | first)
    res["value_l1"] = {
        "sinks": v[:, sink_sel].mean(1).tolist(),
        "first_visual": v[:, 0].tolist(),
        "other_visual": (v[:, rest].mean(1) if bool(rest.any()) else torch.full((L,), float("nan"))).tolist(),
        "text": base["v_l1"][:, ~is_vis].mean(1).tolist(),
    }

    # 6. heatmap data
    res["heat"] = {str(l): {"attention": attn[l].tolist(), "influence_norm": cnorm[l].tolist()} for l in heat_layers
                   if 0 <= l < L}

    # 7. attribution at the fusion layer
    res["attribution"] = _attribution(model, inputs, cfg, rec, st, vis_pos, m, L, effect, answer_id, rng, seed)
    return res


def _attribution(model, inputs, cfg, rec, st, vis_pos, m, L, effect, answer_id, rng, seed) -> dict:
    fusion, crit, source = st.fusion_layer, list(st.critical_tokens), "detected"
    if fusion is None or not crit:
        # not triggered (or nothing critical): probe the layer where the visual influence is largest
        if not rec:
            return {"source": "none", "reason": "no influence rows (nothing after the shallow stage)"}
        fusion = min(rec, key=lambda l: rec[l].min_cos)
        sc = _critical_scores(rec[fusion], cfg)
        sel = (sc > cfg.tokens_threshold).nonzero().squeeze(-1)
        if sel.numel() == 0 or sel.numel() == m:
            sel = sc.argsort(descending=True)[: max(1, m // 10)]
        crit = sorted(int(rec[fusion].visual_ids[i]) for i in sel)
        source = "fallback: fusion did not trigger or selected nothing; lowest-min-cos layer, tokens over threshold (else top 10% by ||c_j||)"
    out = {"source": source, "fusion_layer": int(fusion), "critical_tokens": crit, "num_critical": len(crit)}
    if fusion + 1 >= L:
        out["reason"] = "fusion at the last layer: nothing runs after it"
        return out
    drop_cfg = VisiPrunerConfig(stages=("middle",), shallow_layers=cfg.shallow_layers)
    others = [i for i in range(m) if i not in set(crit)]

    def scheduled(keep):
        with apply(model, drop_cfg, schedule=Schedule(fusion, keep, None)):
            return effect(answer_logprob(model, inputs, answer_id))

    out["keep_only_critical"] = scheduled(crit)
    out["remove_critical"] = scheduled(others)
    with noise_rows(model, fusion + 1, vis_pos[torch.as_tensor(crit, dtype=torch.long)].tolist(), seed):
        out["noise_critical"] = effect(answer_logprob(model, inputs, answer_id))
    if len(others) >= len(crit):
        rand = set(rng.choice(others, size=len(crit), replace=False).tolist())
        out["remove_random_others"] = scheduled([i for i in range(m) if i not in rand])
    return out


# ------------------------------------------------------------------------------------ summary
def _mean(xs):
    xs = [float(x) for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def bootstrap_ci(values, level: float = 0.95, resamples: int = 4000, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of the mean over examples (resampled with replacement).

    None without values; a single value gives a zero-width interval (nothing to resample).
    """
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))
    means = v[idx].mean(axis=1)
    a = (1 - level) / 2
    return [float(np.quantile(means, a)), float(np.quantile(means, 1 - a))]


def harmless(ci, tol: float) -> str:
    """Is a Δ log p within ±tol? 'yes' (whole interval inside), 'no' (wholly outside), 'inconclusive'."""
    if ci is None:
        return "inconclusive"
    lo, hi = ci
    if -tol <= lo and hi <= tol:
        return "yes"
    if hi < -tol or lo > tol:
        return "no"
    return "inconclusive"


def costs(ci, tol: float) -> str:
    """Does a Δ log p cost more than tol? 'yes' (whole interval below -tol), 'no' (none of it), 'inconclusive'."""
    if ci is None:
        return "inconclusive"
    lo, hi = ci
    return "yes" if hi < -tol else "no" if lo >= -tol else "inconclusive"


def at_least_half(ci) -> str:
    """Does a rate reach 50%? 'yes' (whole interval at or above), 'no' (wholly below), 'inconclusive'."""
    if ci is None:
        return "no"
    return "yes" if ci[0] >= 0.5 else "no" if ci[1] < 0.5 else "inconclusive"


def _cond_summary(effects: list[dict]) -> dict:
    d = [e["delta_logp"] for e in effects]
    return {"delta_logp": {**_stats(d), "ci95": bootstrap_ci(d)},
            "accuracy": _mean([e["correct"] for e in effects]),
            "same_top": _mean([e["same_top"] for e in effects]), "n": len(effects)}


def summarise(results: list[dict], cfg: VisiPrunerConfig, num_layers: int, window: int, tolerance: float) -> dict:
    L = num_layers
    s: dict[str, Any] = {"examples": len(results), "num_layers": L, "window": window, "tolerance_nats": tolerance,
                         "config": cfg.to_dict()}
    s["unpruned"] = _cond_summary([r["unpruned"] for r in results])
    from .evaluate import normalize_answer

    gen = [normalize_answer(r["unpruned_answer"]) == normalize_answer(r["gold_answer"]) for r in results
           if r.get("unpruned_answer") is not None and r.get("gold_answer") is not None]
    s["unpruned_answer_accuracy"] = float(np.mean(gen)) if gen else None  # full generated answer, normalised
    s["knockout_all"] = _cond_summary([r["knockout_all"] for r in results])
    s["knockout_prefix"] = []
    for i, j in enumerate(p["layers"] for p in results[0]["knockout_prefix"]):
        c = _cond_summary([r["knockout_prefix"][i] for r in results])
        c.update(layers=j, matters=bool(c["delta_logp"]["mean"] < -tolerance))
        s["knockout_prefix"].append(c)
    s["knockout"] = []
    for i, (a, b) in enumerate((w["start"], w["end"]) for w in results[0]["knockout"]):
        c = _cond_summary([r["knockout"][i] for r in results])
        c.update(start=a, end=b, matters=bool(c["delta_logp"]["mean"] < -tolerance),
                 costs=costs(c["delta_logp"]["ci95"], tolerance))
        s["knockout"].append(c)
    s["sink_test"] = {k: _cond_summary([r["sink_test"][k] for r in results]) for k in results[0]["sink_test"]}
    s["sink_attention_share"] = _stats([r["sink_attention_share"] for r in results])
    s["config_run"] = _cond_summary([r["config_run"] for r in results])
    s["config_run"]["prefill_flops_ratio"] = _stats([r["config_run"]["prefill_flops_ratio"] for r in results])
    s["config_run"]["avg_visual_tokens"] = _stats([r["config_run"]["avg_visual_tokens"] for r in results])
    per_layer = lambda key: [_stats([r[key][l] for r in results]) for l in range(L)]
    s["min_cos"] = per_layer("min_cos")
    s["tokens_over_threshold"] = per_layer("tokens_over_threshold")
    s["visual_attention_per_layer"] = per_layer("visual_attention_per_layer")
    fus = [r["config_run"]["fusion_layer"] for r in results]
    ex = [r["config_run"]["exit_layer"] for r in results]
    s["fusion_layers"] = fus
    s["exit_layers"] = ex
    s["fusion_rate"] = sum(f is not None for f in fus) / len(results)
    s["exit_rate"] = sum(e is not None for e in ex) / len(results)
    s["fusion_rate_ci95"] = bootstrap_ci([float(f is not None) for f in fus])
    s["exit_rate_ci95"] = bootstrap_ci([float(e is not None) for e in ex])
    s["fusion_layer"] = _stats(fus)
    s["exit_layer"] = _stats(ex)
    s["critical_tokens"] = _stats([len(r["config_run"]["critical_tokens"]) for r in results
                                   if r["config_run"]["fusion_layer"] is not None])
    ll = lambda key: [_stats([r["logit_lens"][key][l] for r in results]) for l in range(L)]
    s["logit_lens"] = {k: ll(k) for k in ("residual_logp", "residual_rank", "attn_output_logp", "attn_output_rank")}
    s["value_l1"] = {k: [_stats([r["value_l1"][k][l] for r in results]) for l in range(L)]
                     for k in ("sinks", "first_visual", "other_visual", "text")}
    att = [r["attribution"] for r in results if "keep_only_critical" in r["attribution"]]
    s["attribution"] = {"n": len(att), "detected": sum(a["source"] == "detected" for a in att),
                        "num_critical": _stats([a["num_critical"] for a in att])}
    for k in ("keep_only_critical", "remove_critical", "noise_critical", "remove_random_others"):
        e = [a[k] for a in att if k in a]
        if e:
            s["attribution"][k] = _cond_summary(e)
    # paired per example: how much more removing the critical tokens costs than removing random others
    diff = [a["remove_critical"]["delta_logp"] - a["remove_random_others"]["delta_logp"] for a in att
            if "remove_random_others" in a]
    if diff:
        s["attribution"]["critical_minus_random"] = {**_stats(diff), "ci95": bootstrap_ci(diff)}
    # VisiPruner's own shallow stage beside the knockout it approximates (layers 0..K-1)
    s["shallow_cost"] = {"layers": cfg.shallow_layers, "knockout": s["sink_test"]["block_all_visual"],
                         "visipruner_shallow_stage": s["sink_test"]["visipruner_merge"]}
    s["suggestion"] = suggest(s, cfg)
    s["verdicts"], s["outcomes"] = verdicts(s, cfg)
    return s


def suggest(s: dict, cfg: VisiPrunerConfig) -> dict:
    """Stage boundaries the measurements suggest, and the VisiPrunerConfig they imply."""
    L = s["num_layers"]
    ko = s["knockout"]
    notes = []
    first_matter = next((w["start"] for w in ko if w["matters"]), None)
    last_matter = max((w["end"] - 1 for w in ko if w["matters"]), default=None)
    stages = list(cfg.stages)
    pre = s["knockout_prefix"]
    first_bad = next((p["layers"] for p in pre if p["matters"]), None)
    harmless = [p["layers"] for p in pre if not p["matters"] and (first_bad is None or p["layers"] < first_bad)]
    tol = s["tolerance_nats"]
    if s["knockout_all"]["delta_logp"]["mean"] >= -tol:
        K = cfg.shallow_layers
        notes.append(f"blocking text-to-vision attention in every layer stays within {tol} nats: the model does not "
                     f"use the image through attention (on these examples), so no boundary can be located; K kept at {K}")
    elif not harmless:
        K = cfg.shallow_layers
        if "shallow" in stages:
            stages.remove("shallow")
        notes.append(f"blocking text-to-vision attention already in layer 0 alone changes log p by "
                     f"{_f(pre[0]['delta_logp']['mean']) if pre else 'n/a'} nats: no layers where text can ignore "
                     "the image; the shallow stage is dropped from the suggested stages")
    else:
        j = max(harmless)
        notes.append(f"blocking text-to-vision attention in layers 0..{j - 1} together stays within {tol} nats "
                     f"(mean {_f(next(p for p in pre if p['layers'] == j)['delta_logp']['mean'])})"
                     + (f"; blocking 0..{first_bad - 1} does not" if first_bad is not None else ""))
        bounds = {"joint knockout": j, "clamped to L-2": L - 2}
        if first_matter is not None:
            bounds["first knockout window that matters"] = first_matter
        fus = s["fusion_layer"]["median"]
        if fus is not None:
            bounds["median detected fusion layer - 1 (checks start at K+1)"] = math.floor(fus) - 1
        binding = min(bounds, key=bounds.get)
        K = max(1, bounds[binding])
        notes.append(f"K = {K} (the smallest of: " + ", ".join(f"{k} {v}" for k, v in bounds.items()) + ")")
    if first_matter is not None:
        notes.append(f"the first {s['window']}-layer knockout window that matters starts at layer {first_matter}")
    fusion = s["fusion_layer"]["median"]
    exit_ = s["exit_layer"]["median"]
    layer_threshold = cfg.layer_threshold
    if s["fusion_rate"] < 0.5:
        # make fusion trigger on most examples: below a low quartile of the per-layer median min cos
        lows = [st["median"] for st in s["min_cos"] if st["median"] is not None]
        if lows:
            layer_threshold = float(min(1.0, np.quantile(lows, 0.25) + 1e-6))
            notes.append(f"fusion triggered on {s['fusion_rate']:.0%} of examples; layer_threshold raised to "
                         f"{layer_threshold:.6f} (a low quartile of the per-layer median min cos)")
    else:
        notes.append(f"fusion: median detected layer {fusion} ({s['fusion_rate']:.0%} of examples)")
    if exit_ is not None:
        notes.append(f"exit: median detected layer {exit_} ({s['exit_rate']:.0%} of examples)")
    if last_matter is not None:
        notes.append(f"the last knockout window that matters ends at layer {last_matter}: a knockout-based exit "
                     f"would be after layer {last_matter}")
    if K != cfg.shallow_layers:
        notes.append("the recorded cosines were measured with the config's K; with a different K they change, "
                     "so rerun `visipruner analyze --config suggested_config.json` to confirm")
    new = dataclasses.replace(cfg, shallow_layers=int(K), stages=tuple(stages) or ("middle",),
                              layer_threshold=float(layer_threshold))
    return {"shallow_layers": int(K), "fusion_layer": fusion, "exit_layer": exit_,
            "knockout_first_matters": first_matter, "knockout_last_matters": last_matter,
            "config": new.to_dict(), "notes": notes}


def _f(x, fmt="{:+.3f}"):
    return "n/a" if x is None else fmt.format(x)


def _acc(c):
    return "n/a" if c["accuracy"] is None else f"{c['accuracy']:.2f}"


def _ci(c) -> str:
    """'-0.105 [-0.25, -0.01]': a mean Δ log p and its 95% bootstrap interval over examples."""
    d = c["delta_logp"] if "delta_logp" in c else c
    ci = d.get("ci95")
    return _f(d["mean"]) + ("" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]")


def _rate(rate, ci, n) -> str:
    text = f"{rate:.0%} ({round(rate * n)}/{n}"
    return text + (")" if ci is None else f"; 95% CI {ci[0]:.0%}-{ci[1]:.0%})")


OUTCOME = {"yes": "APPEARS", "no": "DOES NOT APPEAR", "inconclusive": "INCONCLUSIVE"}


def verdicts(s: dict, cfg: VisiPrunerConfig) -> tuple[dict, dict]:
    """Plain statements with the numbers: does each stage appear, appear not, or can these examples not tell?

    Each test compares a 95% bootstrap interval over examples (of a mean Δ log p, or of a rate)
    with the tolerance: a stage APPEARS or DOES NOT APPEAR only when the intervals lie wholly on
    one side; an interval straddling the tolerance makes it INCONCLUSIVE. Returns (statements,
    outcomes): outcomes are 'yes', 'no' or 'inconclusive' per test.
    """
    tol = s["tolerance_nats"]
    K = cfg.shallow_layers
    n = s["examples"]
    out, outcomes = {}, {}
    ko_all = s["knockout_all"]
    used = costs(ko_all["delta_logp"]["ci95"], tol)
    outcomes["vision_used"] = used
    out["vision_used"] = (f"Blocking text-to-vision attention in every layer changes the answer log-prob by "
                          f"{_ci(ko_all)} nats (mean [95% CI over examples]; accuracy {_acc(ko_all)} vs "
                          f"{_acc(s['unpruned'])} unpruned): "
                          + {"yes": "the model uses the image.",
                             "no": "the model barely uses the image through attention; every stage test below is weak.",
                             "inconclusive": "these examples cannot tell whether the model uses the image."}[used])

    # shallow: the knockout of layers 0..K-1 and VisiPruner's own shallow stage must both be harmless
    knock, own = s["shallow_cost"]["knockout"], s["shallow_cost"]["visipruner_shallow_stage"]
    sinks_only = s["sink_test"]["block_topk_sinks"]
    tests = [harmless(knock["delta_logp"]["ci95"], tol), harmless(own["delta_logp"]["ci95"], tol)]
    shallow = "no" if "no" in tests else "yes" if tests == ["yes", "yes"] else "inconclusive"
    outcomes["shallow"] = shallow
    shallow_w = [w for w in s["knockout"] if w["end"] <= K]
    out["shallow"] = (f"Shallow stage (K={K}): {OUTCOME[shallow]}. Blocking all text-to-vision attention in layers "
                      f"0..{K - 1}: {_ci(knock)} nats; VisiPruner's own shallow stage (layer-0 merge, then zeroing): "
                      f"{_ci(own)} nats; blocking the top-k sinks only: {_ci(sinks_only)} nats (tolerance ±{tol}; "
                      "the stage appears when both of the first two intervals lie within it)."
                      + (f" {len(shallow_w)} knockout window(s) inside 0..{K - 1}, worst "
                         f"{_f(min(w['delta_logp']['mean'] for w in shallow_w))} nats." if shallow_w else ""))
    vl = s["value_l1"]
    ratios = [a_["median"] / b_["median"] for a_, b_ in zip(vl["sinks"][:K], vl["other_visual"][:K])
              if a_["median"] is not None and b_["median"]]
    share = s["sink_attention_share"]["median"]
    if ratios:
        r_ = float(np.mean(ratios))
        out["sinks"] = (f"The top-k sinks take a median {_f(share, '{:.0%}')} of the last token's visual attention in "
                        f"layers 0..{K - 1}; their value vectors' L1 norm is {r_:.2f}x that of the other visual tokens "
                        "there (mean over layers of the median ratio): "
                        + ("small values, attention sinks as the paper describes." if r_ < 0.8 else
                           "not smaller, so these tokens are not value-less sinks."))

    # middle: fusion triggers on most examples, and the critical tokens carry the visual information
    fused = at_least_half(s["fusion_rate_ci95"])
    att = s["attribution"]
    mid = (f"Fusion triggered on {_rate(s['fusion_rate'], s['fusion_rate_ci95'], n)} of examples (median layer "
           f"{_f(s['fusion_layer']['median'], '{:.0f}')})")
    if "remove_critical" in att and "critical_minus_random" in att:
        kc = att["keep_only_critical"]
        rc_mean = att["remove_critical"]["delta_logp"]["mean"]
        worse = costs(att["critical_minus_random"]["ci95"], tol)  # removing critical costs more than random
        keep_ok = harmless(kc["delta_logp"]["ci95"], max(tol, abs(rc_mean) / 2))
        held = "no" if "no" in (worse, keep_ok) else "yes" if (worse, keep_ok) == ("yes", "yes") else "inconclusive"
        mid += (f"; at the fusion layer removing the critical tokens: {_ci(att['remove_critical'])} nats, noising "
                f"them: {_ci(att['noise_critical'])}, removing as many random others: "
                f"{_ci(att['remove_random_others'])}, keeping only them: {_ci(kc)}; removing the critical tokens "
                f"minus removing random ones, paired per example: {_ci(att['critical_minus_random'])}. Influence "
                f"attribution {({'yes': 'HOLDS', 'no': 'DOES NOT HOLD', 'inconclusive': 'is INCONCLUSIVE'})[held]} "
                f"(holds when that difference lies below -{tol} and keeping only them stays within "
                f"±{_f(max(tol, abs(rc_mean) / 2), '{:.3f}')})")
    else:
        held = "inconclusive"
        mid += "; attribution not measured (nothing runs after the fusion layer)"
    outcomes["attribution"] = held
    middle = "no" if "no" in (fused, held) else "yes" if (fused, held) == ("yes", "yes") else "inconclusive"
    outcomes["middle"] = middle
    out["middle"] = f"Middle stage: {OUTCOME[middle]}. {mid}."

    # deep: the exit fires on most examples, and the knockout after the median exit layer is harmless
    exited = at_least_half(s["exit_rate_ci95"])
    med_exit = s["exit_layer"]["median"]
    late = [w for w in s["knockout"] if med_exit is not None and w["start"] > med_exit]
    late_tests = [costs(w["delta_logp"]["ci95"], tol) for w in late]
    late_ok = ("no" if "yes" in late_tests else "yes" if late_tests and set(late_tests) == {"no"} else "inconclusive")
    deep = "no" if "no" in (exited, late_ok) else "yes" if (exited, late_ok) == ("yes", "yes") else "inconclusive"
    outcomes["deep"] = deep
    text = (f"Deep stage: {OUTCOME[deep]}. Exit detected on {_rate(s['exit_rate'], s['exit_rate_ci95'], n)} of "
            f"examples (median layer {_f(med_exit, '{:.0f}')})")
    if late:
        worst = min(late, key=lambda w: w["delta_logp"]["mean"])
        text += (f"; {len(late)} knockout window(s) start after it, "
                 f"{sum(t == 'yes' for t in late_tests)} of them cost more than {tol} nats, "
                 f"{sum(t == 'inconclusive' for t in late_tests)} cannot tell; the worst, layers "
                 f"{worst['start']}..{worst['end'] - 1}: {_ci(worst)} nats")
    elif med_exit is not None:
        text += "; no knockout window starts after it, so the knockout cannot confirm it"
    out["deep"] = text + "."
    full = s["config_run"]
    out["config"] = (f"The config as given: {_ci(full)} nats, accuracy {_acc(full)}, "
                     f"same top-1 as unpruned {_f(full['same_top'], '{:.2f}')}, prefill FLOPs "
                     f"{_f(full['prefill_flops_ratio']['mean'], '{:.2f}')} of unpruned.")
    return out, outcomes


# ------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, xs, stats, label, color):
    med = [st["median"] if st["median"] is not None else np.nan for st in stats]
    lo = [st["q25"] if st["q25"] is not None else np.nan for st in stats]
    hi = [st["q75"] if st["q75"] is not None else np.nan for st in stats]
    ax.plot(xs, med, "o-", ms=3, color=color, label=label)
    ax.fill_between(xs, lo, hi, color=color, alpha=0.2)


def make_plots(s: dict, results: list[dict], out: Path, decode: Callable[[int], str], images: list) -> dict[str, str]:
    plt = _plt()
    L, K = s["num_layers"], s["config"]["shallow_layers"]
    layers = list(range(L))
    files = {}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files[name.rsplit(".", 1)[0]] = name

    # 1 knockout
    fig, ax = plt.subplots(figsize=(8, 3.6))
    xs = [(w["start"] + w["end"] - 1) / 2 for w in s["knockout"]]
    _band(ax, xs, [w["delta_logp"] for w in s["knockout"]], "median Δ log p (IQR)", "C0")
    ax.plot(xs, [w["delta_logp"]["mean"] for w in s["knockout"]], "s--", ms=3, color="C3", label="mean Δ log p")
    ax.plot([p["layers"] - 1 for p in s["knockout_prefix"]], [p["delta_logp"]["mean"] for p in s["knockout_prefix"]],
            "D-.", ms=3, color="C4", label="mean Δ log p, layers 0..x blocked together")
    sc = s["shallow_cost"]
    for dx, (key, color, label) in enumerate((("knockout", "C4", f"layers 0..{K - 1} blocked (95% CI)"),
                                              ("visipruner_shallow_stage", "C2", "VisiPruner's shallow stage (95% CI)"))):
        d = sc[key]["delta_logp"]
        if d["mean"] is not None and d["ci95"] is not None:
            ax.errorbar([K - 1 + 0.15 * (2 * dx - 1)], [d["mean"]], fmt="*", ms=9, color=color, capsize=3, label=label,
                        yerr=[[max(0.0, d["mean"] - d["ci95"][0])], [max(0.0, d["ci95"][1] - d["mean"])]])
    ax.axhline(-s["tolerance_nats"], color="gray", ls=":", lw=1, label="-tolerance")
    ax.axvspan(-0.5, K - 0.5, color="C2", alpha=0.08, label=f"config shallow 0..{K - 1}")
    ax.set_xlabel(f"window centre (layer), window = {s['window']}; prefix: last blocked layer")
    ax.set_ylabel("Δ log p(answer)")
    ax2 = ax.twinx()
    ax2.plot(xs, [w["accuracy"] if w["accuracy"] is not None else np.nan for w in s["knockout"]], "^:", color="C1",
             ms=3, label="accuracy (first token)")
    ax2.set_ylabel("accuracy", color="C1")
    ax.set_title("text-to-vision knockout by layer window", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    save(fig, "knockout.png")

    # 2 sink test + 7 attribution
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (title, conds) in zip(axes, [("sink test, layers 0..K-1", s["sink_test"]),
                                         ("attribution at the fusion layer", {k: v for k, v in s["attribution"].items()
                                                                               if isinstance(v, dict) and "delta_logp" in v})]):
        names = list(conds)
        means = [conds[k]["delta_logp"]["mean"] or 0.0 for k in names]
        lo = [max(0.0, (conds[k]["delta_logp"]["mean"] or 0) - (conds[k]["delta_logp"]["q25"] or 0)) for k in names]
        hi = [max(0.0, (conds[k]["delta_logp"]["q75"] or 0) - (conds[k]["delta_logp"]["mean"] or 0)) for k in names]
        ax.bar(range(len(names)), means, yerr=[lo, hi], color="C0", alpha=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=7)
        ax.set_ylabel("mean Δ log p (bars: IQR)")
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3, axis="y")
    save(fig, "sink_attribution.png")

    # 3 influence
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    _band(axes[0], layers, s["min_cos"], "min_j cos(o - c_j, o)", "C0")
    axes[0].axhline(s["config"]["layer_threshold"], color="C3", ls="--", lw=1, label="layer_threshold")
    axes[0].axhline(s["config"]["exit_threshold"], color="C2", ls=":", lw=1, label="exit_threshold")
    axes[0].set_title("influence with the shallow stage on (median, IQR)", fontsize=9)
    _band(axes[1], layers, s["tokens_over_threshold"], "tokens over threshold", "C1")
    axes[1].set_title("tokens with score > tokens_threshold", fontsize=9)
    bins = np.arange(L + 1) - 0.5
    for key, color, lab in (("fusion_layers", "C3", "fusion"), ("exit_layers", "C2", "exit")):
        v = [x for x in s[key] if x is not None]
        if v:
            axes[2].hist(v, bins=bins, alpha=0.6, color=color, label=f"{lab} ({len(v)}/{s['examples']})")
    axes[2].set_title("detected fusion / exit layers", fontsize=9)
    for ax in axes:
        ax.set_xlabel("layer")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if not any(x is not None for x in s["fusion_layers"] + s["exit_layers"]):
        axes[2].text(0.5, 0.5, "no fusion / exit detected", ha="center", transform=axes[2].transAxes)
    save(fig, "influence.png")

    # 4 logit lens + 5 value norms
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    _band(axes[0], layers, s["logit_lens"]["residual_logp"], "residual stream", "C0")
    _band(axes[0], layers, s["logit_lens"]["attn_output_logp"], "attention output (o_proj)", "C1")
    axes[0].set_title("logit lens: log p(answer) of the last token", fontsize=9)
    for k, c in (("sinks", "C3"), ("first_visual", "C4"), ("other_visual", "C0"), ("text", "C7")):
        _band(axes[1], layers, s["value_l1"][k], k.replace("_", " "), c)
    axes[1].set_yscale("log")
    axes[1].set_title("L1 norm of value vectors (median, IQR)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save(fig, "lens_values.png")

    # 6 heatmaps
    from matplotlib.patches import Rectangle

    for i, r in enumerate(results):
        if not r["heat"] or i >= len(images):
            continue
        m = r["num_visual"]
        side = math.isqrt(m)
        if side * side != m:
            continue
        hl = [str(l) for l in heat_layers(s) if str(l) in r["heat"]]
        fig, axes = plt.subplots(2, len(hl), figsize=(2.2 * len(hl), 4.6), squeeze=False)
        crit = r["config_run"]["critical_tokens"]
        img = images[i]
        for col, l in enumerate(hl):
            for row, key in enumerate(("attention", "influence_norm")):
                ax = axes[row][col]
                grid = np.asarray(r["heat"][l][key]).reshape(side, side)
                if img is not None:
                    ax.imshow(np.asarray(img.resize((side * 16, side * 16))), extent=(0, side, side, 0))
                    ax.imshow(grid, extent=(0, side, side, 0), cmap="magma", alpha=0.6)
                else:
                    ax.imshow(grid, extent=(0, side, side, 0), cmap="magma")
                for j in crit:
                    ax.add_patch(Rectangle((j % side, j // side), 1, 1, fill=False, ec="cyan", lw=1))
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"L{l} {'attn' if row == 0 else '||c_j||'}", fontsize=8)
        fig.suptitle(f"example {r['id']}: last-token attention / influence (cyan: critical tokens)", fontsize=9)
        save(fig, f"heatmap_{i}.png")
    return files


# -------------------------------------------------------------------------------------- HTML
EXPLAIN = {
    "knockout": "Each point blocks text-to-vision attention (text queries after the first visual token get "
                "probability 0 on every visual key; the softmax renormalises over the other keys) in a window of "
                "layers and measures the change in log p of the unpruned model's first answer token, teacher-forced "
                "at the last prompt position. Where the curve drops, the model reads the image. The dash-dot curve blocks "
                "layers 0..x together (what a shallow stage of K = x + 1 layers does, renormalised): its last harmless "
                "point is the suggested K. The two stars at layer K-1 put VisiPruner's own shallow stage (what "
                "the runtime does in layers 0..K-1) beside the knockout of those layers, with 95% bootstrap "
                "intervals over examples. Accuracy is the "
                "first-token proxy: greedy first token equals the gold answer's first token.",
    "sink_attribution": "Left: in layers 0..K-1, blocking only the top-k visual tokens the last token attends to "
                        "most (the sinks), as many random other visual tokens, all visual tokens, or running "
                        "VisiPruner's shallow stage (layer 0 merge, then zeroed without renormalising). If the "
                        "shallow stage holds, all are near 0. Right: at the fusion layer, the critical tokens' hidden "
                        "states are replaced by noise of the same norm, or removed (Schedule), vs keeping only them, vs "
                        "removing as many random other visual tokens. Attribution holds when removing the critical "
                        "tokens hurts clearly more than removing random ones and keeping only them is harmless.",
    "influence": "With the config's shallow stage on, per layer > K: min_j cos(o - c_j, o) for the last token "
                 "(fusion triggers below layer_threshold), the number of visual tokens whose ||c_j|| (or "
                 "||c_j||/||o||) exceeds tokens_threshold, and the fusion / exit layers the config detects.",
    "lens_values": "Left: logit lens of the last token, log p of the answer token from final norm + lm_head on the "
                   "residual stream after each layer, and on the layer's attention output after o_proj. Right: L1 "
                   "norms of value vectors (v_proj output) of the sink tokens (top attended in layers 0..K-1), the "
                   "first visual token, the other visual tokens and text tokens. Sinks typically have small values.",
    "heatmap": "Last-token attention (mean over heads) and influence ||c_j|| over the image grid, for layers 0, "
               "K-1, K+1, the median fusion and exit layers and the last layer, of the unmodified model, drawn over the resized image; cyan boxes are the critical tokens "
               "the config selected.",
}


def write_html(s: dict, results: list[dict], out: Path, files: dict, decode: Callable[[int], str]) -> Path:
    def img(name):
        data = base64.b64encode((out / name).read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'

    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>visipruner analyze</title>",
             ("<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
              "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
              "pre{background:#f4f4f4;padding:.5em}.v{background:#fffbe6;padding:.4em;border-left:3px solid #e0b000}</style>"),
             "</head><body><h1>visipruner analyze</h1>",
             (f"<p>{s['examples']} examples, {s['num_layers']} layers, knockout window {s['window']}, tolerance "
              f"{s['tolerance_nats']} nats. Unpruned first-token accuracy: {_acc(s['unpruned'])}; unpruned "
              f"generated-answer accuracy (normalised exact match): {_f(s['unpruned_answer_accuracy'], '{:.2f}')}.</p>"),
             "<h2>Verdicts</h2>",
             ("<p>Intervals are 95% bootstrap intervals of the mean over examples. A stage APPEARS or DOES NOT "
              "APPEAR only when its intervals lie wholly on one side of the tolerance; INCONCLUSIVE means these "
              "examples cannot tell (more examples narrow the intervals).</p>")]
    for k, v in s["verdicts"].items():
        parts.append(f"<p class='v'><b>{esc(k)}</b>: {esc(v)}</p>")
    parts.append("<h2>1. Where does vision matter? Layer-window knockout</h2>")
    parts.append(f"<p>{EXPLAIN['knockout']}</p>{img(files['knockout'])}")
    rows = "".join(f"<tr><td>{w['start']}..{w['end'] - 1}</td><td>{_ci(w)}</td>"
                   f"<td>{_f(w['delta_logp']['median'])}</td><td>{_acc(w)}</td><td>{'yes' if w['matters'] else ''}</td>"
                   f"<td>{w['costs']}</td></tr>" for w in s["knockout"])
    parts.append("<table><tr><th>layers</th><th>mean Δ log p [95% CI]</th><th>median</th><th>accuracy</th>"
                 f"<th>matters (mean)</th><th>costs > {s['tolerance_nats']} (CI)</th></tr>{rows}</table>")
    sc, K = s["shallow_cost"], s["shallow_cost"]["layers"]
    shallow_rows = {f"knockout of layers 0..{K - 1} (true blocking, renormalised)": sc["knockout"],
                    "VisiPruner's shallow stage (layer-0 merge, then zeroing)": sc["visipruner_shallow_stage"],
                    f"blocking only the top-k sinks in layers 0..{K - 1}": s["sink_test"]["block_topk_sinks"]}
    parts.append(f"<h3>Layers 0..{K - 1}: the knockout beside VisiPruner's own shallow stage</h3>"
                 "<table><tr><th>condition</th><th>mean Δ log p [95% CI]</th><th>median</th><th>accuracy</th>"
                 "<th>same top-1</th><th>n</th></tr>"
                 + "".join(f"<tr><td>{esc(k)}</td><td>{_ci(v)}</td><td>{_f(v['delta_logp']['median'])}</td>"
                           f"<td>{_acc(v)}</td><td>{_f(v['same_top'], '{:.2f}')}</td><td>{v['n']}</td></tr>"
                           for k, v in shallow_rows.items()) + "</table>")
    parts.append("<h2>2. Sink test and 7. attribution</h2>")
    parts.append(f"<p>{EXPLAIN['sink_attribution']}</p>{img(files['sink_attribution'])}")
    conds = {**{f"sink: {k}": v for k, v in s["sink_test"].items()},
             **{f"attribution: {k}": v for k, v in s["attribution"].items() if isinstance(v, dict) and "delta_logp" in v},
             **{f"knockout, layers 0..{p['layers'] - 1}": p for p in s["knockout_prefix"]},
             "config as given": s["config_run"], "knockout, all layers": s["knockout_all"]}
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{_ci(v)}</td><td>{_f(v['delta_logp']['median'])}</td>"
                   f"<td>{_acc(v)}</td><td>{_f(v['same_top'], '{:.2f}')}</td><td>{v['n']}</td></tr>" for k, v in conds.items())
    parts.append("<table><tr><th>condition</th><th>mean Δ log p [95% CI]</th><th>median</th><th>accuracy</th>"
                 f"<th>same top-1</th><th>n</th></tr>{rows}</table>")
    a = s["attribution"]
    parts.append(f"<p>Attribution measured on {a['n']} examples ({a['detected']} with a detected fusion layer; "
                 "the rest probe the lowest-min-cos layer).</p>")
    parts.append("<h2>3. Influence, fusion and exit</h2>")
    parts.append(f"<p>{EXPLAIN['influence']} Fusion triggered on {s['fusion_rate']:.0%}, exit on {s['exit_rate']:.0%} "
                 "of examples.</p>" + img(files["influence"]))
    parts.append("<h2>4. Logit lens and 5. value norms</h2>")
    parts.append(f"<p>{EXPLAIN['lens_values']}</p>{img(files['lens_values'])}")
    r0 = results[0]
    lens = r0["logit_lens"]

    def toks(ids):
        return esc(" | ".join(repr(decode(int(i))) for i in ids))

    rows = "".join(f"<tr><td>{l}</td><td>{lens['residual_logp'][l]:.2f}</td><td>{toks(lens['residual_top'][l])}</td>"
                   f"<td>{lens['attn_output_logp'][l]:.2f}</td><td>{toks(lens['attn_output_top'][l])}</td></tr>"
                   for l in range(s["num_layers"]))
    parts.append(f"<p>Example {esc(str(r0['id']))}: answer token {esc(repr(decode(r0['answer_id'])))}.</p>"
                 "<table><tr><th>layer</th><th>residual log p</th><th>residual top tokens</th>"
                 f"<th>attn-output log p</th><th>attn-output top tokens</th></tr>{rows}</table>")
    parts.append("<h2>6. Heatmaps</h2>")
    heat = [n for n in files if n.startswith("heatmap_")]
    parts.append(f"<p>{EXPLAIN['heatmap']}</p>" + ("".join(img(files[n]) for n in sorted(heat)) if heat else
                                                   "<p>No heatmaps (the visual tokens do not form a square grid).</p>"))
    sug = s["suggestion"]
    parts.append("<h2>8. Suggested stage boundaries</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in sug["notes"])
                 + f"</ul><pre>{esc(json.dumps(sug['config'], indent=2))}</pre>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ driver
def _clean(x):
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) or math.isinf(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    return x


def _first_token(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else None


def examples_from_questions(model, processor, questions, max_new_tokens: int = 4, progress=True) -> list[Example]:
    """Model inputs, gold first token and the unpruned model's generated answer for each question."""
    from tqdm.auto import tqdm

    from .bench import _gen_kwargs, _inputs

    tok = processor.tokenizer
    kw = _gen_kwargs(processor, max_new_tokens)
    out = []
    for q in tqdm(questions, desc="prepare", file=sys.stderr, disable=not progress, leave=False):
        inp = _inputs(processor, q, model)
        with torch.no_grad():
            gen = model.generate(**inp, **kw)
        ans = tok.decode(gen[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        out.append(Example(inputs=inp, gold_id=_first_token(tok, q.answer), gold_answer=q.answer,
                           image=q.load_image(), id=q.id, unpruned_answer=ans))
    return out


def heat_layers(s: dict) -> list[int]:
    """Layers shown in the heatmaps: 0, the shallow boundary, the median fusion / exit layers, the last."""
    L, K = s["num_layers"], s["config"]["shallow_layers"]
    picks = {0, max(0, K - 1), min(L - 1, K + 1), L - 1}
    for key in ("fusion_layer", "exit_layer"):
        med = s[key]["median"]
        if med is not None:
            picks.add(int(med))
    if len(picks) < 6:
        picks.add(L // 2)
    return sorted(picks)


def analyze(model, processor, questions, out_dir, *, config: VisiPrunerConfig | None = None, window: int | None = None,
            limit: int | None = 24, stride: int = 1, sinks: int = 4, tolerance: float = 0.1, topk: int = 5,
            heatmap_examples: int = 3, examples: list[Example] | None = None, progress: bool = True, seed: int = 0) -> dict:
    """Run every measurement and write ``out_dir`` (JSON, PNGs, report.html, suggested_config.json).

    Either ``questions`` (with ``processor``) or pre-built ``examples`` (no processor needed; token
    strings are then shown as ids). Returns the summary dict (also in ``analysis.json``).
    Raises TypeError for an unsupported model.
    """
    from tqdm.auto import tqdm

    adapter = get_adapter(model)  # TypeError / ValueError for unsupported models, before any work
    L = len(adapter.layers)
    if config is None:
        from .recommend import recommended_config

        config = recommended_config(model)
    if not isinstance(config, VisiPrunerConfig):
        raise TypeError(f"config must be a VisiPrunerConfig, got {type(config).__name__}")
    if config.shallow_layers >= L:
        raise InputError(f"config.shallow_layers={config.shallow_layers} must be below the model's {L} layers")
    window = window or max(1, L // 8)
    if window < 1:
        raise InputError(f"window must be >= 1, got {window}")
    if examples is None:
        if processor is None:
            raise ValueError("analyze() needs a processor to turn questions into inputs, or pre-built examples=")
        questions = list(questions)[:limit] if limit else list(questions)
        examples = examples_from_questions(model, processor, questions, progress=progress)
    elif limit:
        examples = examples[:limit]
    if not examples:
        raise InputError("no examples to analyze")
    for e in examples:
        ids = e.inputs["input_ids"]
        if ids.shape[0] != 1:
            raise ValueError(f"example {e.id!r}: batch size {ids.shape[0]}; analyze runs prompts one at a time")
        if not bool(adapter.visual_mask(ids).any()):
            raise ValueError(f"example {e.id!r} has no visual tokens")
    if processor is not None:
        tok = processor.tokenizer

        def decode(i):
            return tok.decode([i])
    else:
        def decode(i):
            return f"<{i}>"

    heat = range(L)  # every layer for the heatmap examples; the plots pick a few
    was_training = model.training
    model.eval()
    results = []
    per_example = 1 + len(windows(L, window, stride)) + 1 + len(prefix_sizes(L, window)) + 1 + 4 + 1 + 1 + 4  # forward passes (attribution: up to 4)
    bar = tqdm(total=per_example * len(examples), desc="analyze (forward passes)", unit="fwd", file=sys.stderr,
               disable=not progress)
    try:
        for i, e in enumerate(examples):
            results.append(analyze_example(model, e, config, window, stride=stride, sinks=sinks, topk=topk,
                                           heat_layers=heat if i < heatmap_examples else (), seed=seed + i,
                                           tick=lambda: bar.update(1)))
            bar.update(per_example * (i + 1) - bar.n)  # attribution may run fewer passes
            bar.set_postfix(example=f"{i + 1}/{len(examples)}")
    finally:
        bar.close()
        model.train(was_training)
    images = ([e.image for e in examples[:heatmap_examples]] if any(e.image is not None for e in examples)
              else [None] * min(heatmap_examples, len(examples)))
    return write_report(_clean(results), config, L, window, tolerance, out_dir, decode, images)


def write_report(results: list[dict], config: VisiPrunerConfig, num_layers: int, window: int, tolerance: float,
                 out_dir, decode: Callable[[int], str], images: list) -> dict:
    """Summary, verdicts, plots, ``analysis.json``, ``suggested_config.json`` and ``report.html``
    from the per-example results (``analyze_example``'s dicts, as ``analysis.json`` stores them)."""
    summary = _clean(summarise(results, config, num_layers, window, tolerance))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = make_plots(summary, results, out, decode, images)
    for r in results:
        r["answer_token"] = decode(r["answer_id"])
        for k in ("residual_top", "attn_output_top"):
            r["logit_lens"][k + "_tokens"] = [[decode(i) for i in row] for row in r["logit_lens"][k]]
    summary["files"] = files
    (out / "analysis.json").write_text(json.dumps({"summary": summary, "examples": results}, indent=1))
    suggested = VisiPrunerConfig.from_dict(summary["suggestion"]["config"])
    (out / "suggested_config.json").write_text(suggested.to_json(indent=2) + "\n")
    write_html(summary, results, out, files, decode)
    return summary


def _run(args) -> int:
    from . import inputs
    from .bench import _load_model

    for flag, value in (("--limit", args.limit), ("--window", args.window), ("--stride", args.stride),
                        ("--sinks", args.sinks)):
        inputs.at_least(flag, value, 1)
    inputs.positive("--tolerance", args.tolerance)
    config = inputs.method_config("--config", args.config, VisiPrunerConfig) if args.config else None
    inputs.model_dir("--model", args.model)
    inputs.output_file("--out", str(Path(args.out) / "analysis.json"))
    questions = inputs.read_questions(args.data, limit=args.limit)
    model, processor = _load_model(args)
    # errors inside analyze() other than InputError (e.g. a TypeError) are bugs: they keep their traceback
    s = analyze(model, processor, questions, args.out, config=config, window=args.window, limit=args.limit,
                stride=args.stride, sinks=args.sinks, tolerance=args.tolerance)
    for k, v in s["verdicts"].items():
        print(f"[{k}] {v}")
    sc = s["shallow_cost"]
    print(f"[shallow cost] layers 0..{sc['layers'] - 1}: knockout {_ci(sc['knockout'])} nats, VisiPruner's shallow "
          f"stage {_ci(sc['visipruner_shallow_stage'])} nats (mean [95% CI])")
    for n in s["suggestion"]["notes"]:
        print(f"- {n}")
    print("suggested config:")
    print(VisiPrunerConfig.from_dict(s["suggestion"]["config"]).to_json(indent=2))
    print(f"wrote {Path(args.out) / 'report.html'}, analysis.json, suggested_config.json and plots", file=sys.stderr)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("analyze", help="where vision matters; whether VisiPruner's stages appear",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="question file (JSONL)")
    p.add_argument("--model", help="a saved Llava directory (default: the embedded model)")
    p.add_argument("--out", required=True, help="output folder (JSON, PNGs, report.html, suggested_config.json)")
    p.add_argument("--limit", type=int, default=24, help="analyze the first N examples (default 24)")
    p.add_argument("--window", type=int, help="knockout window in layers (default max(1, L // 8))")
    p.add_argument("--stride", type=int, default=1, help="knockout window stride (default 1)")
    p.add_argument("--config", help="VisiPrunerConfig JSON (a file or the JSON text; default: recommended)")
    p.add_argument("--sinks", type=int, default=4, help="k for the sink test (top-k attended visual tokens)")
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="|Δ log p| in nats below which an intervention counts as harmless (default 0.1)")
    p.set_defaults(func=_run)
    return p
