"""Prometheus aggregates of the per-request records (``records.py``), named ``visipruner_*``.

They live in the process that runs the model. vLLM's ``/metrics`` endpoint serves the API server
process's registry, plus, when ``PROMETHEUS_MULTIPROC_DIR`` is set (vLLM sets it itself when it
runs several API servers), every process's; see README, "Serving with vLLM".
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PRUNED_REQUESTS = Counter("visipruner_pruned_requests", "Requests whose prompt the plugin pruned", ["method"])
VISUAL_TOKENS = Counter("visipruner_visual_tokens", "Visual tokens in pruned prompts", ["method"])
FLOPS_RATIO = Histogram("visipruner_prefill_flops_ratio", "Executed / dense prefill FLOPs of the language model",
                        ["method"], buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
FUSION_LAYER = Histogram("visipruner_fusion_layer", "VisiPruner's fusion layer per request (-1: none)", ["method"],
                         buckets=tuple(range(-1, 81)))
EXIT_LAYER = Histogram("visipruner_exit_layer", "VisiPruner's exit layer per request (-1: none)", ["method"],
                       buckets=tuple(range(-1, 81)))
MEAN_VISUAL = Histogram("visipruner_mean_visual_tokens_per_layer", "Visual tokens per layer in prefill, averaged "
                        "over layers", ["method"], buckets=(0, 8, 16, 32, 64, 128, 256, 576, 1152, 2304, 4608))


def observe(rec: dict) -> None:
    m = rec["method"]
    PRUNED_REQUESTS.labels(m).inc()
    VISUAL_TOKENS.labels(m).inc(rec["visual_tokens"])
    FLOPS_RATIO.labels(m).observe(rec["prefill_flops_ratio"])
    FUSION_LAYER.labels(m).observe(-1 if rec["fusion_layer"] is None else rec["fusion_layer"])
    EXIT_LAYER.labels(m).observe(-1 if rec["exit_layer"] is None else rec["exit_layer"])
    per_layer = rec["visual_tokens_per_layer"]
    MEAN_VISUAL.labels(m).observe(sum(per_layer) / len(per_layer) if per_layer else 0)
