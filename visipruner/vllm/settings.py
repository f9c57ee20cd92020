"""What the vLLM plugin prunes with, read from the model's HF config, and the settings it refuses.

The method and its config come from the model folder's ``config.json`` (what ``visipruner
calibrate`` and ``recommended_config`` store) or from vLLM's own ``hf_overrides``; a model
without one is served unpruned. Keys of the HF config:

``visipruner_config``    a method config as a dict, ``{"method": "visipruner", ...}`` (any method of
                         ``visipruner.methods.CONFIGS`` that acts inside the language model).
``visipruner_schedule``  optional, VisiPruner only: a forced ``Schedule`` (fusion layer, critical
                         tokens, exit layer) instead of measured decisions (benchmarks).
``visipruner_record``    optional: a JSONL file that gets one line per pruned request (see
                         ``records.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, VisiPrunerConfig
from ..methods import (CDPrunerConfig, DARTConfig, DivPruneConfig, Schedule, SparseVLMConfig, VisionZipConfig,
                       config_from_dict)

CONFIG_KEY = "visipruner_config"
SCHEDULE_KEY = "visipruner_schedule"
RECORD_KEY = "visipruner_record"

# methods whose mechanism the plugin does not run: merges of hidden states (token recycling),
# text-row raters, reduction before the language model
_UNSUPPORTED = {
    DARTConfig: "its token-merge decisions",
    SparseVLMConfig: "its token recycling (merges of hidden states)",
    VisionZipConfig: "it acts before the language model (vLLM's processor fixes each prompt's placeholder count)",
    CDPrunerConfig: "it selects before the first layer, which the plugin's layer loop does not run yet",
    DivPruneConfig: "it selects before the first layer, which the plugin's layer loop does not run yet",
}


@dataclass
class ServeSettings:
    """The pruning one engine serves: a method config, and for VisiPruner an optional forced schedule."""

    config: MethodConfig
    schedule: Schedule | None = None
    record_path: str | None = None

    def build(self):
        """A fresh method object (one per request: decisions are per prompt)."""
        if isinstance(self.config, VisiPrunerConfig):
            return self.config.build(schedule=self.schedule)
        return self.config.build()


def read_settings(hf_config) -> ServeSettings | None:
    """The settings stored in a model's HF config; None when it has none (the model serves unpruned)."""
    stored = getattr(hf_config, CONFIG_KEY, None)
    if not stored:
        return None
    if not isinstance(stored, dict):
        raise ValueError(f"visipruner: {CONFIG_KEY} in the model's config must be a dict, got {type(stored).__name__}")
    config = config_from_dict(stored)
    schedule = getattr(hf_config, SCHEDULE_KEY, None)
    if schedule is not None:
        if not isinstance(config, VisiPrunerConfig):
            raise ValueError(f"visipruner: {SCHEDULE_KEY} applies to VisiPruner configs only, not {config.method!r}")
        schedule = Schedule(**schedule)
    return ServeSettings(config, schedule, getattr(hf_config, RECORD_KEY, None))


def check_engine(settings: ServeSettings, vllm_config) -> None:
    """Refuse, in one line naming the setting and the fix, what pruning inside vLLM cannot honour."""
    cfg = settings.config
    for kind, why in _UNSUPPORTED.items():
        if isinstance(cfg, kind):
            raise ValueError(f"visipruner: method {cfg.method!r} is not supported under vLLM ({why}); "
                             "serve visipruner, fastv, pdrop, vtw or random")
    if isinstance(cfg, VisiPrunerConfig) and cfg.enabled and "shallow" in cfg.stages:
        raise ValueError(
            "visipruner: the shallow stage changes text-to-vision attention, which vLLM's attention kernels "
            "cannot take; serve a config with stages=['middle', 'deep']")
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(
            "visipruner: prefix caching shares KV blocks between prompts, but a pruned layer's blocks hold only "
            "that prompt's kept tokens; start vLLM with enable_prefix_caching=False (--no-enable-prefix-caching)")
    mm = vllm_config.model_config.multimodal_config
    if mm is not None and mm.is_multimodal_pruning_enabled():
        raise ValueError(
            "visipruner: vLLM's video pruning (EVS) removes video tokens before the language model, which the "
            "plugin's decisions do not account for; start vLLM without video_pruning_rate (--video-pruning-rate)")
    sched = vllm_config.scheduler_config
    if sched.enable_chunked_prefill:
        raise ValueError(
            "visipruner: chunked prefill can split a prompt across steps, and pruning decides on the whole "
            "prompt; start vLLM with enable_chunked_prefill=False (--no-enable-chunked-prefill)")
    if vllm_config.speculative_config is not None:
        raise ValueError(
            "visipruner: speculative decoding verifies several tokens per step against layers whose KV cache "
            "pruning shortened; start vLLM without speculative_config (--speculative-config)")
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        raise ValueError(
            "visipruner: pipeline parallelism splits the layers whose token sets pruning changes across "
            "processes; start vLLM with pipeline_parallel_size=1")
    if not vllm_config.model_config.enforce_eager:
        raise ValueError(
            "visipruner: pruned layers run on a number of tokens that changes per request, which compiled "
            "graphs cannot replay; start vLLM with enforce_eager=True (--enforce-eager)")
    from .kv_memory import SCHEDULER, BoundedKVScheduler, kv_tiers

    if kv_tiers(settings, vllm_config.model_config.hf_text_config.num_hidden_layers):
        if not issubclass(sched.get_scheduler_cls(), BoundedKVScheduler):
            raise ValueError(
                "visipruner: exit_by allocates the KV cache of the layers from it for text tokens only, which needs "
                f"the plugin's scheduler; start vLLM with scheduler_cls={SCHEDULER!r} (--scheduler-cls {SCHEDULER})")
        if sched.disable_hybrid_kv_cache_manager:
            raise ValueError(
                "visipruner: exit_by puts the layers from it in KV-cache groups of their own, which needs vLLM's "
                "hybrid KV cache manager; start vLLM without disable_hybrid_kv_cache_manager")
