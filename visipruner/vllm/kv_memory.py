"""KV memory for text only in the layers no visual token reaches: a KV-cache group of our own in vLLM.

With a bound on the vision exit (``VisiPrunerConfig.exit_by``: layers from ``exit_by`` on hold no
visual token but a prompt's last one), those layers' KV cache never holds a visual token, so vLLM
need not allocate blocks for them there. Three pieces, each on one of vLLM's plugin points:

* ``TextOnlyAttentionSpec``: the KV-cache spec of those layers, registered in vLLM's KV-cache spec
  registry with ``TextOnlyManager``. It is its own base type, not a ``FullAttentionSpec`` subclass:
  vLLM merges every ``FullAttentionSpec`` (subclasses included) into one group, and the saving needs
  the layers in groups of their own, each with its own block table (vLLM's hybrid grouping, as for
  sliding-window layers; page sizes are equal, so the split is by layer count: e.g. 16 + 16 layers
  give 2 groups, 6 + 10 give 1 + 2 groups of 6 layer slots, one of them padding).
* ``TextOnlyManager``: vLLM's full-attention manager, asked for ``num_tokens`` minus the request's
  visual tokens (its multimodal placeholders, but the prompt's last token: pruning keeps that one).
* ``TextKVScheduler``: vLLM's scheduler (``--scheduler-cls``, vLLM's documented plugin point) that
  hands its request table to the managers, the only place a request's placeholders are known (the
  manager API gets request ids only). ``settings.check_engine`` refuses a bound served without it.

The model's layers get the spec through ``use_text_only_spec`` (instance-level, on our own model's
attention modules: vLLM asks each module for its spec). The binding (``pruner.py``) writes a
layer's kept tokens through that layer's own group's block table.
"""

from __future__ import annotations

import dataclasses
import types

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

SCHEDULER = "visipruner.vllm.kv_memory.TextKVScheduler"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextOnlyAttentionSpec(AttentionSpec):
    """Full attention over a request's text tokens only (its visual tokens never reach the layer).
    Carries ``FullAttentionSpec``'s fields so attention backends read it like one."""

    sliding_window: int | None = None
    attention_chunk_size: int | None = None
    non_causal: bool = False

    def max_memory_usage_bytes(self, vllm_config) -> int:  # a text-only prompt of max_model_len
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes


def visual_tokens(request, num_tokens: int) -> int:
    """The request's visual tokens among its first ``num_tokens``, but its prompt's last token."""
    end = min(num_tokens, request.num_prompt_tokens - 1)
    n = 0
    for feature in request.mm_features or ():
        r = feature.mm_position
        hi = min(r.offset + r.length, end)
        if hi > r.offset:
            n += hi - r.offset if r.is_embed is None else int(r.is_embed[: hi - r.offset].sum())
    return n


class TextOnlyManager(FullAttentionManager):
    """Allocates a request's text tokens only; ``requests`` is the scheduler's request table."""

    requests: dict | None = None

    def _text(self, request_id: str, num_tokens: int) -> int:
        if self.requests is None:
            raise RuntimeError(f"visipruner: text-only KV layers need the scheduler {SCHEDULER} (--scheduler-cls)")
        return num_tokens - visual_tokens(self.requests[request_id], num_tokens)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(request_id, self._text(request_id, num_tokens), *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        return super().allocate_new_blocks(request_id, self._text(request_id, num_tokens),
                                           self._text(request_id, num_tokens_main_model))


class TextKVScheduler(Scheduler):
    """vLLM's scheduler, its request table shared with the text-only KV managers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, TextOnlyManager):
                manager.requests = self.requests


def register() -> None:
    """Registers the spec with vLLM (every process: the scheduler's and the workers'). vLLM's own specs
    first: its registry registers them only while it is empty."""
    KVCacheSpecRegistry.check_kv_cache_spec_registry({})
    KVCacheSpecRegistry.register(TextOnlyAttentionSpec, TextOnlyManager)


def text_only_from(config, num_layers: int) -> int | None:
    """The first layer no visual token reaches under ``config`` (None: every layer may hold them)."""
    bound = getattr(config, "exit_by", None)
    return bound if bound is not None and config.enabled and bound < num_layers else None


def use_text_only_spec(attn_modules) -> None:
    """Gives each of these attention modules (our model's own) the text-only spec instead of full attention."""
    for attn in attn_modules:
        attn.get_kv_cache_spec = types.MethodType(_text_only_spec, attn)
        attn._full_kv_cache_spec = type(attn).get_kv_cache_spec


def _text_only_spec(attn, vllm_config):
    spec = attn._full_kv_cache_spec(attn, vllm_config)
    if type(spec) is not FullAttentionSpec:
        raise ValueError(f"visipruner: exit_by needs full-attention layers, {attn.layer_name} has {type(spec).__name__}; "
                         "serve the config without exit_by")
    return TextOnlyAttentionSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init})
