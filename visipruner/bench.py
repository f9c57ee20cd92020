"""`visipruner bench`: every method on the same model and data, accuracy next to FLOPs and time.

    visipruner bench --quick --json bench.json        # embedded model, subset of its test set
    visipruner bench --model DIR --data FILE.jsonl     # any supported Llava and question file

For the unpruned model and each method at its published default and at budgets matched to
VisiPruner's (average visual tokens per layer), it reports accuracy, agreement with the unpruned
answers, average visual tokens per layer, prefill FLOPs (ours and FastV's formula) relative to
unpruned, prefill latency relative to unpruned (medians of warmed-up repeats, interleaved with
the unpruned model in the same run), decode time per token and its ratio to unpruned (also
interleaved, on every timed prompt), and the prompt's KV-cache size. Timing ratios carry 90%
bootstrap intervals over the timed prompts; the unpruned row times the unpruned model against
itself, which gives the noise floor, and settings whose pruned decode is slower are named.
Accuracy runs answer ``--batch-size`` prompts per generate call (each row pruned as if alone, so
the answers are those of batch size 1); latency is timed one prompt at a time. With a batch size
above 1, each setting's throughput on one batch of that size is timed too (tokens per second of a
prefill plus ``--batch-new-tokens`` greedy steps, and the batch's KV-cache bytes, pruned against
unpruned in the same run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import apply
from .config import AttentionSelectConfig, MethodConfig, VisiPrunerConfig
from .methods import CDPrunerConfig, DARTConfig, DivPruneConfig, FastVConfig, PDropConfig, RandomConfig, SparseVLMConfig, VisionZipConfig, VTWConfig
from .methods.layer_drop import _depth_scaled

PEERS = ("fastv", "pdrop", "vtw", "dart", "visionzip", "sparsevlm", "cdpruner", "divprune", "random", "attention")


@dataclass
class Setting:
    method: str
    setting: str  # "default" or "matched"
    config: MethodConfig | None  # None: unpruned
    records: list = field(default_factory=list)


# ------------------------------------------------------------------------ matched budgets
def _avg_fraction_layer_drop(num_layers: int, plan: list[tuple[int, float]]) -> float:
    """Average visual fraction per layer when keeping `ratio` of the present tokens after each layer."""
    frac, total, at = 1.0, 0.0, 0
    for layer, ratio in sorted(plan):
        total += frac * (layer + 1 - at)
        at = layer + 1
        frac *= ratio
    total += frac * (num_layers - at)
    return total / num_layers


def _solve(fn, target: float) -> float:
    """Ratio in [0, 1] with fn(ratio) == target (fn increasing), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) < target else (lo, mid)
    return round((lo + hi) / 2, 4)


def matched_configs(num_layers: int, fraction: float, visipruner_cfg: VisiPrunerConfig) -> dict[str, MethodConfig]:
    """Peer configs whose average visual tokens per layer equal ``fraction`` of the unpruned."""
    L = num_layers

    def one_layer(k):
        return _solve(lambda r: _avg_fraction_layer_drop(L, [(k, r)]), fraction)

    pdrop_layers = _depth_scaled((8, 16, 24), L)
    svlm = SparseVLMConfig()
    svlm_layers = svlm.layers_for(L)

    def svlm_avg(scale):  # keep fractions scaled by a common factor, as ratios of the tokens present
        fr = [min(1.0, scale * f) for f in svlm.keep_fractions]
        prev = [1.0] + fr[:-1]
        return _avg_fraction_layer_drop(L, [(l, f / p if p > 0 else 0.0) for l, f, p in zip(svlm_layers, fr, prev)])

    top = 1.0 / svlm.keep_fractions[-1]  # scale at which every fraction reaches 1
    svlm_scale = _solve(lambda s: svlm_avg(s * top), fraction) * top
    vtw_layer = min(L - 1, max(0, round(fraction * L) - 1))
    return {
        "fastv": FastVConfig(layer=2, keep_ratio=one_layer(2)),
        "pdrop": PDropConfig(layers=pdrop_layers, keep_ratio=_solve(
            lambda r: _avg_fraction_layer_drop(L, [(l, r) for l in pdrop_layers]), fraction)),
        "vtw": VTWConfig(layer=vtw_layer),
        "dart": DARTConfig(layer=2, keep_ratio=one_layer(2)),
        # before the LLM every layer sees the kept tokens: the fraction itself, split 162:30
        "visionzip": VisionZipConfig(dominant_ratio=round(fraction * 162 / 192, 4),
                                     contextual_ratio=round(fraction * 30 / 192, 4)),
        "sparsevlm": SparseVLMConfig(keep_fractions=tuple(round(min(1.0, svlm_scale * f), 4) for f in svlm.keep_fractions)),
        "random": RandomConfig(layer=2, keep_ratio=one_layer(2)),
        # before the LLM (every layer sees the kept tokens): the fraction itself
        "cdpruner": CDPrunerConfig(keep_ratio=round(min(1.0, max(1e-4, fraction)), 4)),
        "divprune": DivPruneConfig(keep_ratio=round(min(1.0, max(1e-4, fraction)), 4)),
        "attention": AttentionSelectConfig(**{k: v for k, v in visipruner_cfg.to_dict().items() if k != "method"}),
    }


def default_configs(visipruner_cfg: VisiPrunerConfig) -> dict[str, MethodConfig]:
    return {
        "visipruner": visipruner_cfg,
        "fastv": FastVConfig(),
        "pdrop": PDropConfig(),
        "vtw": VTWConfig(),
        "dart": DARTConfig(),
        "visionzip": VisionZipConfig(),
        "sparsevlm": SparseVLMConfig(),
        "random": RandomConfig(),
        "cdpruner": CDPrunerConfig(),
        "divprune": DivPruneConfig(),
        "attention": AttentionSelectConfig(**{k: v for k, v in visipruner_cfg.to_dict().items() if k != "method"}),
    }


# ------------------------------------------------------------------------------- running
def _inputs(processor, question, model):
    from .evaluate import build_prompt

    inp = processor(images=[question.load_image()], text=[build_prompt(processor, question.question)],
                    return_tensors="pt")
    dtype = next(model.parameters()).dtype
    return {k: (v.to(dtype) if k == "pixel_values" else v) for k, v in inp.items()}


def _gen_kwargs(processor, max_new_tokens):
    tok = processor.tokenizer
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if isinstance(eos, int) and eos >= 0:
        kw["eos_token_id"] = eos
    return kw


def _kv_bytes(model, tokens_per_layer: list[int]) -> int:
    from .evaluate import kv_bytes_per_token

    return int(sum(tokens_per_layer) * kv_bytes_per_token(model))


@torch.no_grad()
def answer_all(model, processor, questions, config, max_new_tokens, progress_desc, batch_size: int = 1) -> list[dict]:
    """Each question's answer and what pruning did to its prompt. ``batch_size`` > 1 answers that many
    prompts per ``generate`` call (left-padded; each row pruned as if alone, so the answers and
    statistics are those of batch size 1)."""
    from .adapters import get_adapter
    from .evaluate import answer_batches, normalize_answer

    kw = _gen_kwargs(processor, max_new_tokens)
    visual = get_adapter(model).visual_mask
    num_layers = model.config.text_config.num_hidden_layers
    out = []
    prompts = (_inputs(processor, q, model) for q in questions)
    batches = answer_batches(model, processor, prompts, config, kw, batch_size, progress_desc, total=len(questions))
    for inps, preds, stats in batches:
        for q, inp, pred, s in zip(questions[len(out):], inps, preds, stats):
            n = int(inp["input_ids"].shape[1])
            n_vis = int(visual(inp["input_ids"]).sum())
            rec = {"id": q.id, "family": q.family, "answer": q.answer, "prediction": pred,
                   "correct": normalize_answer(pred) == normalize_answer(q.answer), "num_visual": n_vis}
            if s is not None and s.pruning_applied:
                rec.update(avg_visual_tokens=s.avg_visual_tokens, prefill_flops_ratio=s.prefill_flops_ratio,
                           prefill_flops_ratio_fastv=s.prefill_flops_fastv / s.dense_prefill_flops_fastv,
                           kv_cache_bytes=_kv_bytes(model, s.tokens_per_layer),
                           fusion_layer=s.fusion_layer, exit_layer=s.exit_layer,
                           critical_tokens=len(s.critical_tokens), padding_flops=s.padding_flops)
            else:
                rec.update(avg_visual_tokens=float(n_vis), prefill_flops_ratio=1.0, prefill_flops_ratio_fastv=1.0,
                           kv_cache_bytes=_kv_bytes(model, [n] * num_layers))
            out.append(rec)
    return out


BOOTSTRAP_DRAWS = 2000
INTERVAL = (5.0, 95.0)  # percentiles: a 90% interval


@dataclass
class LayerTimeFit:
    """Seconds per decoder layer as ``a + b n + c n^2`` and refits on resampled repeats.

    ``draws[i]`` is the fit to one bootstrap resample of the timed repeats at each length: the
    spread of the draws is the fit's uncertainty from timing noise.
    """

    coef: tuple[float, float, float]
    draws: np.ndarray  # (BOOTSTRAP_DRAWS, 3)


def _bootstrap_rng() -> np.random.Generator:
    return np.random.default_rng(0)  # fixed: the same timings give the same interval


def _interval(values) -> list[float]:
    lo, hi = np.percentile(np.asarray(values, dtype=float), INTERVAL)
    return [float(lo), float(hi)]


@torch.no_grad()
def fit_layer_time(model, length: int, repeats: int = 3) -> LayerTimeFit:
    """Seconds per decoder layer as ``a + b n + c n^2``, fitted on unpruned language-model runs.

    Timed at five lengths from 10% to 100% of ``length`` (inputs_embeds, no cache; lengths
    interleaved within each repeat). The intercept is what FLOPs do not see: reading every
    layer's weights and the per-layer framework overhead, which no token pruning removes; it
    predicts how far a FLOPs ratio can turn into time.
    """
    from .adapters import get_adapter

    lm = get_adapter(model).language_model
    L = model.config.text_config.num_hidden_layers
    d = model.config.text_config.hidden_size
    p = next(lm.parameters())
    ns = sorted({max(2, round(f * length)) for f in (0.1, 0.3, 0.5, 0.75, 1.0)})
    xs = {n: torch.randn(1, n, d, dtype=p.dtype, device=p.device) for n in ns}
    for n in ns:
        lm(inputs_embeds=xs[n], use_cache=False)  # warm-up
    times = {n: [] for n in ns}
    for _ in range(max(2, repeats)):
        for n in ns:
            t0 = time.perf_counter()
            lm(inputs_embeds=xs[n], use_cache=False)
            times[n].append((time.perf_counter() - t0) / L)
    X = np.array([[1.0, n, n * n] for n in ns])

    def fit(per_length):
        return np.linalg.lstsq(X, np.array([statistics.median(t) for t in per_length]), rcond=None)[0]

    coef = fit([times[n] for n in ns])
    rng = _bootstrap_rng()
    draws = np.array([fit([rng.choice(times[n], size=len(times[n])) for n in ns]) for _ in range(BOOTSTRAP_DRAWS)])
    return LayerTimeFit(tuple(float(c) for c in coef), draws)


def _modelled_seconds(coef, tokens_per_layer) -> float:
    a, b, c = coef
    return sum(a + b * n + c * n * n for n in tokens_per_layer)


def _ratio_interval(num, den) -> list[float]:
    """90% bootstrap interval of ``sum(num) / sum(den)`` over prompts (resampled in pairs)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    idx = _bootstrap_rng().integers(0, len(num), size=(BOOTSTRAP_DRAWS, len(num)))
    return _interval(num[idx].sum(1) / den[idx].sum(1))


@torch.no_grad()
def time_prefill_and_decode(model, processor, questions, config, repeats: int, decode_steps: int,
                            layer_time: LayerTimeFit | None = None) -> dict:
    """Prefill and decode time per prompt, pruned and unpruned interleaved in the same run.

    Prefill: medians of ``repeats`` warmed-up runs per prompt. Decode: per prompt, the prompt is
    prefilled (untimed) and ``decode_steps`` single-token steps are timed against its cache,
    pruned and unpruned alternating, ``repeats`` times; ms per token is the median. Every timed
    prompt is used for both. Ratios are sums over prompts; their 90% intervals are bootstrap
    resamples of the prompts (``*_ci``). Image features are computed once and passed in, so the
    vision encoder is in neither time, except for methods acting on the vision encoder's output
    (VisionZip): there both sides run from pixels. The FLOPs ratio reported with the times is
    that of the timed prompts; with ``layer_time`` (``fit_layer_time``) the latency a per-layer
    time model predicts is added, with an interval that resamples both the prompts and the fit.
    """
    # features precomputed where the family takes them that way (LLaVA's get_image_features); other
    # families run from pixels on both sides (the vision encoder then sits in both times)
    from_pixels = isinstance(config, VisionZipConfig) or type(model).__name__ != "LlavaForConditionalGeneration"
    prompts = []
    for q in questions:
        inp = _inputs(processor, q, model)
        if from_pixels:
            prompts.append((inp, None))
        else:
            feats = model.model.get_image_features(pixel_values=inp.pop("pixel_values"), return_dict=True)
            prompts.append((inp, feats))

    def call_inputs(inp, feats):
        return inp if feats is None else {**inp, "mm_encoder_outputs": {"image": feats}}

    def prefill(inp, feats):
        return model(**call_inputs(inp, feats), use_cache=False, logits_to_keep=1)

    seen = {}

    def once(inp, feats, cfg):
        if cfg is None:
            t = time.perf_counter()
            prefill(inp, feats)
            return time.perf_counter() - t
        with apply(model, cfg) as h:
            t = time.perf_counter()
            prefill(inp, feats)
            t = time.perf_counter() - t
        seen["stats"] = h.last_stats
        return t

    def decode_once(inp, feats, cfg):
        """ms per token of ``decode_steps`` greedy steps after an untimed prefill."""
        from .evaluate import time_generation

        handle = apply(model, cfg) if cfg is not None else None
        try:
            return time_generation(model, call_inputs(inp, feats), decode_steps + 1)[1] * 1e3
        finally:
            if handle is not None:
                handle.remove()

    dense, pruned, model_p, model_d, tpls, n0s = [], [], [], [], [], []
    flops, flops_dense = [], []
    L = model.config.text_config.num_hidden_layers
    for inp, feats in prompts:
        once(inp, feats, None), once(inp, feats, config)  # warm-up
        d, p = [], []
        for _ in range(repeats):
            d.append(once(inp, feats, None))
            p.append(once(inp, feats, config))
        dense.append(statistics.median(d))
        pruned.append(statistics.median(p))
        n0 = int(inp["input_ids"].shape[1])
        st = seen.get("stats")
        if st is not None and st.pruning_applied:
            flops.append(st.prefill_flops)
            flops_dense.append(st.dense_prefill_flops)
            tpl = list(st.tokens_per_layer)
            n0 = st.prompt_length
        else:
            tpl = [n0] * L
        tpls.append(tpl)
        n0s.append(n0)
        if layer_time is not None:
            model_p.append(_modelled_seconds(layer_time.coef, tpl))
            model_d.append(_modelled_seconds(layer_time.coef, [n0] * L))
    out = {
        "prefill_ms_unpruned": sum(dense) / len(dense) * 1e3,
        "prefill_ms": sum(pruned) / len(pruned) * 1e3,
        "prefill_latency_ratio": sum(pruned) / sum(dense),
        "prefill_latency_ratio_ci": _ratio_interval(pruned, dense),
        "timed_prefill_flops_ratio": sum(flops) / sum(flops_dense) if flops else 1.0,
        "timed_prompts": len(prompts),
    }
    if len(flops) == len(prompts):  # realised / FLOPs-predicted speed-up = FLOPs ratio / latency ratio
        fp, fd, pr, de = (np.asarray(v, float) for v in (flops, flops_dense, pruned, dense))
        idx = _bootstrap_rng().integers(0, len(pr), size=(BOOTSTRAP_DRAWS, len(pr)))
        out["realised_over_predicted_ci"] = _interval((fp[idx].sum(1) / fd[idx].sum(1)) / (pr[idx].sum(1) / de[idx].sum(1)))
    if layer_time is not None and not from_pixels:
        out["modelled_latency_ratio"] = sum(model_p) / sum(model_d)
        out["realised_over_modelled_ci"] = _realised_over_modelled_interval(layer_time, tpls, n0s, L, pruned, dense)

    # decode: pruned and unpruned alternate on every prompt, so drift hits both alike
    if config is not None:
        decode_once(*prompts[0], None), decode_once(*prompts[0], config)  # warm-up
    dec_d, dec_p = [], []
    for inp, feats in prompts:
        d, p = [], []
        for _ in range(repeats):  # unpruned setting: unpruned against itself (the noise floor)
            d.append(decode_once(inp, feats, None))
            p.append(decode_once(inp, feats, config))
        dec_d.append(statistics.median(d))
        dec_p.append(statistics.median(p))
    out["decode_ms_per_token"] = sum(dec_p) / len(dec_p)
    out["decode_ms_per_token_unpruned"] = sum(dec_d) / len(dec_d)
    out["decode_ms_per_token_per_prompt"] = dec_p
    out["decode_ms_per_token_unpruned_per_prompt"] = dec_d
    out["decode_latency_ratio"] = sum(dec_p) / sum(dec_d)
    out["decode_latency_ratio_ci"] = _ratio_interval(dec_p, dec_d)
    # slower: the whole interval lies above 1 (pruned decode takes longer than unpruned)
    out["decode_slower"] = config is not None and out["decode_latency_ratio_ci"][0] > 1.0
    return out


@torch.no_grad()
def time_batch(model, processor, questions, config, batch_size: int, repeats: int, new_tokens: int) -> dict:
    """Throughput of one left-padded batch of the first ``batch_size`` questions: a prefill, then
    ``new_tokens`` greedy steps (no end-of-sequence stop), pruned and unpruned interleaved, medians
    of ``repeats`` warmed-up runs. Pixels go in on both sides (the vision encoder is in both times).
    KV bytes: what the cache's tensors hold (a padded batch is as wide, per layer, as its longest row
    there) and what the rows' own tokens need (a per-row cache). Empty when the method refuses batches."""
    from .evaluate import collate_prompts, rows_kv_bytes, time_generation

    inps = [_inputs(processor, q, model) for q in questions[:batch_size]]
    batch = collate_prompts(inps, processor.tokenizer.pad_token_id)

    def pruned_run(steps):
        if config is None:  # the unpruned setting: unpruned against itself (the noise floor)
            return time_generation(model, batch, steps), None
        with apply(model, config) as h:
            return time_generation(model, batch, steps), h.batch_stats

    time_generation(model, batch, 2)  # warm-up
    try:
        _, stats = pruned_run(2)
    except ValueError as e:
        print(f"bench: no batched timing for {config.method}: {e}", file=sys.stderr)
        return {}
    dense, pruned = [], []
    for _ in range(repeats):
        dense.append(time_generation(model, batch, new_tokens))
        p, stats = pruned_run(new_tokens)
        pruned.append(p)
    med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
    out = {"batch_size": len(inps), "batch_new_tokens": new_tokens}
    for side, runs in (("_unpruned", dense), ("", pruned)):
        prefill, step = med(runs, 0), med(runs, 1)
        out[f"batch_prefill_s{side}"] = prefill
        out[f"batch_decode_ms_per_step{side}"] = step * 1e3
        out[f"batch_tokens_per_s{side}"] = len(inps) * new_tokens / (prefill + step * (new_tokens - 1))
        out[f"batch_kv_bytes{side}"] = runs[0][2]
    out["batch_prefill_ratio"] = out["batch_prefill_s"] / out["batch_prefill_s_unpruned"]
    out["batch_decode_throughput_ratio"] = out["batch_decode_ms_per_step_unpruned"] / out["batch_decode_ms_per_step"]
    out["batch_throughput_ratio"] = out["batch_tokens_per_s"] / out["batch_tokens_per_s_unpruned"]
    out["batch_kv_ratio"] = out["batch_kv_bytes"] / out["batch_kv_bytes_unpruned"]
    if stats is not None:
        out["batch_kv_rows_ratio"] = (rows_kv_bytes(model, stats, new_tokens - 1)
                                      / rows_kv_bytes(model, stats, new_tokens - 1, pruned=False))
    return out


def _realised_over_modelled_interval(fit: LayerTimeFit, tpls, n0s, L, pruned, dense) -> list[float]:
    """90% interval of modelled/measured latency ratio: prompts resampled, and a fit draw each time."""
    rng = _bootstrap_rng()
    pruned, dense = np.asarray(pruned, float), np.asarray(dense, float)
    vals = []
    for coef in fit.draws:
        idx = rng.integers(0, len(tpls), size=len(tpls))
        mp = sum(_modelled_seconds(coef, tpls[i]) for i in idx)
        md = sum(_modelled_seconds(coef, [n0s[i]] * L) for i in idx)
        vals.append((mp / md) / (pruned[idx].sum() / dense[idx].sum()))
    return _interval(vals)


def summarise(setting: Setting, reference: list[dict] | None, timing: dict) -> dict:
    from .evaluate import normalize_answer

    recs = setting.records
    n = len(recs)
    mean = lambda key: sum(r[key] for r in recs) / n  # noqa: E731
    agree = (sum(normalize_answer(r["prediction"]) == normalize_answer(u["prediction"]) for r, u in zip(recs, reference)) / n
             if reference is not None else 1.0)
    n_vis = mean("num_visual")
    row = {
        "method": setting.method,
        "setting": setting.setting,
        "config": setting.config.to_dict() if setting.config is not None else None,
        "n": n,
        "accuracy": mean("correct"),
        "agreement": agree,
        "avg_visual_tokens": mean("avg_visual_tokens"),
        "avg_visual_fraction": mean("avg_visual_tokens") / n_vis if n_vis else 0.0,
        "prefill_flops_ratio": mean("prefill_flops_ratio"),
        "prefill_flops_ratio_fastv": mean("prefill_flops_ratio_fastv"),
        "kv_cache_bytes": mean("kv_cache_bytes"),
        **timing,
    }
    if "prefill_latency_ratio" in timing:
        # the speedup the timed prompts' FLOPs predict, against the one measured on them
        predicted = 1.0 / timing.get("timed_prefill_flops_ratio", row["prefill_flops_ratio"])
        row["realised_over_predicted_speedup"] = (1.0 / timing["prefill_latency_ratio"]) / predicted
        if "modelled_latency_ratio" in timing:
            row["realised_over_modelled_speedup"] = timing["modelled_latency_ratio"] / timing["prefill_latency_ratio"]
    fus = [r["fusion_layer"] for r in recs if r.get("fusion_layer") is not None]
    if fus:
        row["mean_fusion_layer"] = sum(fus) / len(fus)
    return row


def run_bench(model, processor, questions, visipruner_cfg: VisiPrunerConfig, methods=("visipruner",) + PEERS,
              matched: bool = True, timing_prompts: int = 4, repeats: int = 3, decode_steps: int = 8,
              max_new_tokens: int = 6, batch_size: int = 1, batch_new_tokens: int = 16,
              batch_timing: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    L = model.config.text_config.num_hidden_layers
    rows = []
    unpruned = Setting("unpruned", "default", None)
    unpruned.records = answer_all(model, processor, questions, None, max_new_tokens, "unpruned", batch_size)
    timing_q = questions[:timing_prompts]
    length = int(_inputs(processor, timing_q[0], model)["input_ids"].shape[1])
    layer_time = fit_layer_time(model, length, repeats)
    base_timing = time_prefill_and_decode(model, processor, timing_q, None, repeats, decode_steps)
    if batch_timing and batch_size > 1:
        base_timing.update(time_batch(model, processor, questions, None, batch_size, repeats, batch_new_tokens))
    rows.append(summarise(unpruned, None, {**base_timing, "prefill_latency_ratio": 1.0,
                                           "layer_time_fit_s": list(layer_time.coef),
                                           "layer_time_fit_ci_s": [_interval(c) for c in layer_time.draws.T]}))
    defaults = default_configs(visipruner_cfg)
    settings = [Setting(m, "default", defaults[m]) for m in methods if m in defaults]
    bar = tqdm(total=len(settings) * (2 if matched else 1), desc="methods", file=sys.stderr)

    def run(s: Setting):
        s.records = answer_all(model, processor, questions, s.config, max_new_tokens, f"{s.method}/{s.setting}",
                               batch_size)
        timing = time_prefill_and_decode(model, processor, timing_q, s.config, repeats, decode_steps, layer_time)
        if batch_timing and batch_size > 1:
            timing.update(time_batch(model, processor, questions, s.config, batch_size, repeats, batch_new_tokens))
        rows.append(summarise(s, unpruned.records, timing))
        bar.update(1)

    for s in settings:
        run(s)
    if matched:
        vp = next((r for r in rows if r["method"] == "visipruner"), None)
        if vp is not None:
            for name, cfg in matched_configs(L, vp["avg_visual_fraction"], visipruner_cfg).items():
                if name in methods and name != "attention":  # attention is matched by construction
                    run(Setting(name, "matched", cfg))
    bar.close()
    return rows


# ---------------------------------------------------------------------------------- output
def _pm(value, ci) -> str:
    """``value±h``: h is the larger distance from the value to its 90% interval's ends."""
    if value is None:
        return "-"
    if not ci:
        return f"{value:.3f}"
    return f"{value:.3f}±{max(value - ci[0], ci[1] - value):.3f}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'method':<12}{'setting':<9}{'acc':>7}{'agree':>7}{'vis/layer':>10}{'FLOPs':>7}{'FastV':>7}"
            f"{'latency':>14}{'real/pred':>14}{'real/model':>14}{'dec ms/tok':>11}{'dec ratio':>14}{'KV MiB':>8}"
            + (f"{'batch tok/s':>12}{'batch KV':>9}" if any("batch_throughput_ratio" in r for r in rows) else ""))
    print(head)
    print("-" * len(head))
    for r in rows:
        unpruned = r["method"] == "unpruned"
        lat = _pm(r["prefill_latency_ratio"], None if unpruned else r.get("prefill_latency_ratio_ci"))
        dec = _pm(r.get("decode_latency_ratio"), r.get("decode_latency_ratio_ci")) if not unpruned else "1"
        if r.get("decode_slower"):
            dec += "!"
        print(f"{r['method']:<12}{r['setting']:<9}{r['accuracy']:>7.3f}{r['agreement']:>7.3f}"
              f"{r['avg_visual_tokens']:>10.1f}{r['prefill_flops_ratio']:>7.3f}{r['prefill_flops_ratio_fastv']:>7.3f}"
              f"{lat:>14}{_pm(r.get('realised_over_predicted_speedup'), r.get('realised_over_predicted_ci')):>14}"
              f"{_pm(r.get('realised_over_modelled_speedup'), r.get('realised_over_modelled_ci')):>14}"
              f"{r['decode_ms_per_token']:>11.2f}{dec:>14}{r['kv_cache_bytes'] / 2**20:>8.2f}"
              + (f"{r['batch_throughput_ratio']:>11.2f}x{r['batch_kv_ratio']:>8.2f}x" if "batch_throughput_ratio" in r
                 else f"{'-':>12}{'-':>9}" if any("batch_throughput_ratio" in x for x in rows) else ""))
    for line in timing_notes(rows):
        print(line)


def timing_notes(rows: list[dict]) -> list[str]:
    """What the table's timing columns rest on: noise floor, baseline stability, slower decode."""
    notes = ["±: half-width of a 90% bootstrap interval over the timed prompts (real/model: the "
             "per-layer time fit resampled too)"]
    un = next((r for r in rows if r["method"] == "unpruned"), None)
    if un is not None and "decode_latency_ratio_ci" in un:
        notes.append(f"noise floor (unpruned against itself, same run): prefill "
                     f"{_pm(un['prefill_ms'] / un['prefill_ms_unpruned'], un['prefill_latency_ratio_ci'])}, "
                     f"decode {_pm(un['decode_latency_ratio'], un['decode_latency_ratio_ci'])}")
    base = [r["decode_ms_per_token_unpruned"] for r in rows if r.get("decode_ms_per_token_unpruned")]
    if len(base) > 1:
        med = statistics.median(base)
        notes.append(f"unpruned decode baseline over the {len(base)} settings: median {med:.2f} ms/token, "
                     f"range {min(base):.2f}-{max(base):.2f} ({(max(base) - min(base)) / med:.0%} of the median)")
    b = next((r for r in rows if "batch_throughput_ratio" in r), None)
    if b is not None:
        notes.append(f"batch tok/s: tokens per second of one left-padded batch of {b['batch_size']} prompts "
                     f"(prefill + {b['batch_new_tokens']} greedy steps), pruned / unpruned in the same run; "
                     f"batch KV: its cache's bytes / unpruned (padded to each layer's longest row; "
                     f"'batch_kv_rows_ratio' in the JSON: the rows' own tokens)")
    slower = [f"{r['method']}/{r['setting']} ({r['decode_latency_ratio']:.3f})" for r in rows if r.get("decode_slower")]
    notes.append("pruned decode slower than unpruned (interval above 1, marked !): "
                 + (", ".join(slower) if slower else "none"))
    return notes


def plot_pareto(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r["method"] for r in rows})
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        for r in rows:
            if r["method"] != m:
                continue
            ax.scatter(r["prefill_flops_ratio"], r["accuracy"], color=cmap(i % 10),
                       marker="o" if r["setting"] == "default" else "s", s=60,
                       label=f"{m}" if r["setting"] == "default" or m not in [x['method'] for x in rows if x['setting'] == 'default'] else None)
            ax.annotate(f"{m}{'*' if r['setting'] == 'matched' else ''}", (r["prefill_flops_ratio"], r["accuracy"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("prefill FLOPs / unpruned (language model)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs prefill FLOPs (o: published default, s/*: matched to VisiPruner's budget)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _applies(model, method: str, visipruner_cfg: VisiPrunerConfig) -> bool:
    """Whether ``method``'s default config attaches to ``model`` (e.g. VisionZip needs a per-patch projector)."""
    try:
        apply(model, default_configs(visipruner_cfg)[method]).remove()
    except ValueError as e:
        print(f"bench: skipping {method}: {e}", file=sys.stderr)
        return False
    return True


def _load_model(args):
    if args.model:
        from .models.organism import load_model_dir

        return load_model_dir(args.model)
    from .models import load_organism

    return load_organism()


def default_questions(quick: bool, root: str | Path | None = None):
    """The embedded model's test data, which nothing was tuned on.

    Generated scenes of the ``test`` split (a stream neither training nor calibration read; the
    split they scored is ``dev``) and easy-vqa test questions spread evenly over the file, half a
    stride away from the ones calibration holds out (``scripts/calibration_data.py``), so the two
    share none. ``root``: where the question files are written (default: the model cache).
    """
    from .data import easyvqa, scenes
    from .data.questions import load_questions
    from .models.organism import cache_dir

    n_scenes, n_easy = (24, 8) if quick else (600, 200)
    root = Path(root) if root is not None else cache_dir() / "data"
    # the stream id is in the folder name: before the dev/test split, "test" named another stream
    scene_dir = root / f"scenes_test{scenes.SPLITS['test']}_{n_scenes}"
    path = scene_dir / "test.jsonl"
    if not path.exists():
        scenes.write_split(str(scene_dir), "test", n=n_scenes, seed=0)
    easy = easyvqa.write_jsonl(str(root / "easyvqa"), "test")
    qs = load_questions(path)
    easy_qs = load_questions(easy)
    step = max(1, len(easy_qs) // n_easy)
    return qs + easy_qs[step // 2::step][:n_easy]


def _run(args) -> int:
    from . import inputs

    quick = QUICK if args.quick else FULL
    for name, value in quick.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    budgets = _budgets(args.budgets) if args.budgets else None
    for flag, value in (("--limit", args.limit), ("--timing-prompts", args.timing_prompts), ("--repeats", args.repeats),
                        ("--decode-steps", args.decode_steps), ("--threads", args.threads),
                        ("--batch-size", args.batch_size), ("--batch-new-tokens", args.batch_new_tokens)):
        inputs.at_least(flag, value, 1)
    everything = ("visipruner",) + PEERS
    methods = everything if args.methods is None else inputs.choices("--methods", args.methods, everything)
    cfg = (inputs.method_config("--visipruner-config", args.visipruner_config, VisiPrunerConfig)
           if args.visipruner_config else None)
    inputs.model_dir("--model", args.model)
    inputs.output_file("--json", args.json)
    inputs.output_file("--png", args.png)
    questions = (inputs.read_questions(args.data, limit=args.limit) if args.data
                 else default_questions(args.quick)[: args.limit])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, processor = _load_model(args)
    if cfg is None:
        from . import recommended_config

        cfg = recommended_config(model)
    if args.methods is None:  # every method, except those that refuse this model (said, not silent)
        methods = tuple(m for m in methods if _applies(model, m, cfg))
    print(f"bench: {len(questions)} questions, {len(methods)} methods, VisiPruner config {cfg.to_json()}", file=sys.stderr)
    if budgets:
        return _run_budgets(args, model, processor, questions, cfg, methods, budgets)
    rows = run_bench(model, processor, questions, cfg, methods, matched=not (args.no_matched or args.quick),
                     batch_timing=not args.quick,
                     timing_prompts=args.timing_prompts, repeats=args.repeats, decode_steps=args.decode_steps,
                     batch_size=args.batch_size, batch_new_tokens=args.batch_new_tokens)
    print_table(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    _write_plot(args, rows, plot_pareto)
    return 0


def _write_plot(args, rows, plot) -> None:
    """The plot beside the JSON (or at --png), drawn by ``plot(rows, path)``."""
    png = args.png or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if png:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        plot(rows, png)
        print(f"wrote {png}", file=sys.stderr)


# --quick: the README's main job, about 5 minutes on 2 idle cores whatever the number of methods (light
# timing, no matched runs); without it, the full comparison
QUICK = {"timing_prompts": 1, "repeats": 1, "decode_steps": 4, "batch_size": 4}
FULL = {"timing_prompts": 4, "repeats": 3, "decode_steps": 8, "batch_size": 4}


def _budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"bench: --budgets takes comma-separated fractions such as 0.11,0.22,0.33; got {text!r}")
    bad = [v for v in values if not 0 < v <= 1]
    if not values or bad:
        raise SystemExit(f"bench: --budgets fractions must be in (0, 1]; got {text!r}")
    return values


def _run_budgets(args, model, processor, questions, cfg, methods, budgets) -> int:
    from .budgets import plot_budgets, print_budget_table, run_budgets

    def save(rows):  # after every setting: a long run that is stopped keeps what it measured
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=2))

    rows = run_budgets(model, processor, questions, cfg, [m for m in methods if m != "attention"], budgets,
                       batch_size=args.batch_size, on_row=save, score=args.score)
    print_budget_table(rows)
    if args.json:
        save(rows)
        print(f"wrote {args.json}", file=sys.stderr)
    _write_plot(args, rows, plot_budgets)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="compare pruning methods: accuracy, FLOPs, latency",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a saved Llava directory (default: the embedded model)")
    p.add_argument("--data", help="question file (JSONL); default: the embedded model's test set (scene test "
                   "split + easy-vqa test, nothing tuned on it)")
    p.add_argument("--quick", action="store_true", help="the main job: a small subset of the test set (32 questions), every method at its default, "
                   "timing on one prompt once, no matched-budget runs and no batched timing")
    p.add_argument("--limit", type=int, help="use only the first N questions")
    p.add_argument("--methods", help=f"comma-separated subset of visipruner,{','.join(PEERS)}")
    p.add_argument("--visipruner-config", help="VisiPruner config JSON (default: recommended for the model)")
    p.add_argument("--no-matched", action="store_true", help="skip the matched-budget runs")
    p.add_argument("--budgets", help="comma-separated budgets, fractions of the visual tokens (e.g. 0.11,0.22,0.33): "
                   "each method's accuracy as %% of the unpruned model's at each budget, with 90%% bootstrap "
                   "intervals, and a plot of %% retained against budget (no timing)")
    p.add_argument("--score", choices=["auto", "gold", "agreement"], default="auto",
                   help="--budgets: score answers against the gold answers, or against the unpruned model's "
                        "(%% retained is then the agreement); auto: agreement when the question file has no gold "
                        "answers (real photos, python -m visipruner.data.photos)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per generate call for the accuracy runs (each row pruned as if alone); above 1, "
                        "each setting's throughput on one batch of this size is also timed (batch tok/s, batch KV)")
    p.add_argument("--batch-new-tokens", type=int, default=16,
                   help="greedy steps of the batched throughput timing")
    p.add_argument("--timing-prompts", type=int, default=None, help="prompts timed per setting (default 4; --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per prompt (default 3; --quick 1)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (default 8; --quick 4)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="write every number here (a list of records)")
    p.add_argument("--png", help="accuracy vs prefill FLOPs plot (default: next to --json)")
    p.set_defaults(func=_run)
    return p
