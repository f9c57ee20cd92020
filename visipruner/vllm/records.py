"""Per-request pruning figures of the vLLM plugin: one record per pruned prompt.

Each pruned prefill gives a record (a dict): ``prompt_fingerprint`` (``fingerprint(prompt
token ids)``: match it to a request with ``RequestOutput.prompt_token_ids``), ``prompt_tokens``,
``visual_tokens``, ``method``, ``fusion_layer``, ``exit_layer``, ``critical_tokens`` (count),
``visual_tokens_per_layer``, ``kept_fingerprint`` (of the positions of the tokens each layer ran on: two
runs with the same value kept the same tokens in every layer), ``prefill_flops_ratio`` (executed / dense
prefill FLOPs of the language model), ``details`` (the method's own figures, e.g. VisiPruner's min cos per
checked layer). Where it goes, from one process (tensor parallelism: TP rank 0; every rank takes the same
decisions and keeps its own record in ``RECENT`` only):

* a log line ``visipruner: {json}`` at INFO on the ``visipruner.vllm`` logger (the server's log);
* a JSONL file, one line per record, when the model's HF config names one (``visipruner_record``);
* ``RECENT`` (the last records of this process; tests and in-process engines read it);
* Prometheus counters/histograms (``visipruner_*``) in the process that runs the model; see
  ``metrics.py``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading

logger = logging.getLogger("visipruner.vllm")
RECENT: collections.deque = collections.deque(maxlen=4096)
_LOCK = threading.Lock()


def fingerprint(prompt_token_ids) -> str:
    """A short stable id of a prompt's token ids (the same in the record and for the caller)."""
    ids = [int(t) for t in prompt_token_ids]
    return hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16]


class Recorder:
    """Turns a pruned prefill's ``PruneStats`` into a record and sends it where configured."""

    def __init__(self, method: str, path: str | None = None, observers=(), emit: bool = True):
        self.method = method
        self.path = path
        self.observers = list(observers)
        self.emit = emit  # False on TP ranks > 0: the record only in this process's RECENT

    def __call__(self, stats, prompt_ids) -> dict:
        rec = {
            "prompt_fingerprint": fingerprint(prompt_ids.tolist()),
            "prompt_tokens": stats.prompt_length,
            "visual_tokens": stats.num_visual_tokens,
            "method": self.method,
            "fusion_layer": stats.fusion_layer,
            "exit_layer": stats.exit_layer,
            "critical_tokens": len(stats.critical_tokens),
            "critical_token_ids": list(stats.critical_tokens),
            "visual_tokens_per_layer": list(stats.visual_tokens_per_layer),
            "kept_fingerprint": fingerprint([p for pos in stats.layer_positions for p in [-1, *pos.tolist()]]),
            "prefill_flops_ratio": round(stats.prefill_flops_ratio, 6),
            "details": {k: ({str(a): b for a, b in v.items()} if isinstance(v, dict) else v)
                        for k, v in stats.method.items()},  # e.g. VisiPruner's min cos per checked layer
        }
        line = json.dumps(rec)
        with _LOCK:
            RECENT.append(rec)
        if not self.emit:
            return rec
        logger.info("visipruner: %s", line)
        with _LOCK:
            if self.path:
                with open(self.path, "a") as f:
                    f.write(line + "\n")
        for observe in self.observers:
            observe(rec)
        return rec
