"""KV memory for what pruning leaves: vLLM KV-cache groups of our own for the layers after a bound.

With a bound on the vision exit (``VisiPrunerConfig.exit_by``: layers from ``exit_by`` on hold no
visual token but a prompt's last one), those layers' KV cache never holds a visual token, so vLLM
need not allocate blocks for them there; with a fusion budget and ``fusion_fallback_layer`` f too,
layers f+1 .. exit_by-1 hold at most the budget's visual tokens. Three pieces, each on one of vLLM's
plugin points:

* ``BoundedAttentionSpec``: the KV-cache spec of those layers, registered in vLLM's KV-cache spec
  registry with ``BoundedManager``. It is its own base type, not a ``FullAttentionSpec`` subclass:
  vLLM merges every ``FullAttentionSpec`` (subclasses included) into one group, and the saving needs
  the layers in groups of their own, each with its own block table (vLLM's hybrid grouping, as for
  sliding-window layers). Page sizes are equal, so vLLM splits by layer count, every group as large
  as the smallest spec's layer count: ``layer_specs`` cuts each tier into parts so that no group is
  padded (6 full + 10 text layers: 8 groups of 2, rather than 1 + 2 groups of 6 with 2 padding slots).
* ``BoundedManager``: vLLM's full-attention manager, asked for ``num_tokens`` minus the visual tokens
  the layers never hold (the request's multimodal placeholders, but the prompt's last token, which
  pruning keeps, and the budget's share of them in a middle tier).
* ``BoundedKVScheduler``: vLLM's scheduler (``--scheduler-cls``, vLLM's documented plugin point) that
  hands its request table to the managers, the only place a request's placeholders are known (the
  manager API gets request ids only). ``settings.check_engine`` refuses a bound served without it.

The model's layers get their spec through ``use_bounded_specs`` (instance attributes of our own
model's attention modules: vLLM asks each module for its spec). The binding (``pruner.py``) writes a
layer's kept tokens through that layer's own group's block table and checks they fit the bound.
"""

from __future__ import annotations

import dataclasses
import math
import types

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from ..config import VisiPrunerConfig

SCHEDULER = "visipruner.vllm.kv_memory.BoundedKVScheduler"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BoundedAttentionSpec(AttentionSpec):
    """Full attention over a request's text tokens and at most a budget of its visual tokens (none:
    text only): the layers after a fusion or exit bound. ``part`` splits a tier's layers into vLLM
    groups of equal size (see ``layer_specs``). Carries ``FullAttentionSpec``'s fields so attention
    backends read it like one."""

    keep_ratio: float | None = None  # the fusion budget, as VisiPrunerConfig's (None and 0 tokens: text only)
    keep_tokens: int = 0
    part: int = 0
    sliding_window: int | None = None
    attention_chunk_size: int | None = None
    non_causal: bool = False

    def max_memory_usage_bytes(self, vllm_config) -> int:  # a text-only prompt of max_model_len
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

    def allowance(self, num_visual: int) -> int:
        """The most visual tokens a request with ``num_visual`` of them holds in these layers."""
        if self.keep_ratio is None and not self.keep_tokens:
            return 0
        return VisiPrunerConfig(keep_ratio=self.keep_ratio, keep_tokens=self.keep_tokens or None).budget(num_visual)


def visual_tokens(request, end: int) -> int:
    """The request's visual tokens (its multimodal placeholders' embedding positions) before ``end``."""
    n = 0
    for feature in request.mm_features or ():
        r = feature.mm_position
        hi = min(r.offset + r.length, end)
        if hi > r.offset:
            n += hi - r.offset if r.is_embed is None else int(r.is_embed[: hi - r.offset].sum())
    return n


class BoundedManager(FullAttentionManager):
    """vLLM's full-attention manager, asked for a request's tokens but the visual ones its layers never
    hold; ``requests`` is the scheduler's request table."""

    requests: dict | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._not_held: dict[str, int] = {}  # request id -> prompt tokens these layers never hold

    def _held(self, request_id: str, num_tokens: int) -> int:
        if self.requests is None:
            raise RuntimeError(f"visipruner: bounded KV layers need the scheduler {SCHEDULER} (--scheduler-cls)")
        request = self.requests[request_id]
        prompt = request.num_prompt_tokens
        if num_tokens >= prompt and request_id in self._not_held:  # every step of a running request
            return num_tokens - self._not_held[request_id]
        every = visual_tokens(request, min(num_tokens, prompt))
        dropped = visual_tokens(request, min(num_tokens, prompt - 1))  # pruning keeps a prompt's last token
        if num_tokens >= prompt:
            self._not_held[request_id] = dropped - self.kv_cache_spec.allowance(every)
        return num_tokens - dropped + self.kv_cache_spec.allowance(every)

    def pop_blocks_for_free(self, request_id: str):  # a finished or preempted request (free() calls it too)
        self._not_held.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(request_id, self._held(request_id, num_tokens), *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        return super().allocate_new_blocks(request_id, self._held(request_id, num_tokens),
                                           self._held(request_id, num_tokens_main_model))


class BoundedKVScheduler(Scheduler):
    """vLLM's scheduler, its request table shared with the bounded KV managers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, BoundedManager):
                manager.requests = self.requests


def register() -> None:
    """Registers the spec with vLLM (every process: the scheduler's and the workers'). vLLM's own specs
    first: its registry registers them only while it is empty."""
    KVCacheSpecRegistry.check_kv_cache_spec_registry({})
    KVCacheSpecRegistry.register(BoundedAttentionSpec, BoundedManager)


@dataclasses.dataclass(frozen=True)
class Tier:
    """Layers ``first``.. hold a request's text and at most ``keep_ratio`` / ``keep_tokens`` of its visual
    tokens (neither: text only)."""

    first: int
    keep_ratio: float | None = None
    keep_tokens: int = 0


def kv_tiers(settings, num_layers: int) -> list[Tier]:
    """The bounds a VisiPruner config with ``exit_by`` sets on what its layers hold: from ``exit_by`` on text
    only; with a budget and ``fusion_fallback_layer`` f (or a forced schedule's fusion), from f + 1 on text
    and at most the budget. [] without ``exit_by`` (every layer may hold every token)."""
    cfg, schedule = settings.config, settings.schedule
    bound = getattr(cfg, "exit_by", None)
    if bound is None or not cfg.enabled:
        return []
    tiers = [Tier(bound)] if bound < num_layers else []
    if schedule is not None and schedule.fusion_layer is not None:
        middle = Tier(schedule.fusion_layer + 1, keep_tokens=len(schedule.critical_tokens))
    elif cfg.budgeted and cfg.fusion_fallback_layer is not None:
        middle = Tier(cfg.fusion_fallback_layer + 1, cfg.keep_ratio, cfg.keep_tokens or 0)
    else:
        middle = None
    if middle is not None and middle.first < min(bound, num_layers):
        tiers.insert(0, middle)
    return tiers


def layer_specs(tiers: list[Tier], num_layers: int) -> dict[int, tuple[Tier, int]]:
    """{layer: (tier, part)} of the bounded layers. vLLM puts layers of one spec in groups of equal size
    (the smallest spec's layer count), padding the rest: each tier is cut into parts of the greatest
    common divisor of the tiers' sizes (the full-attention layers' included), so no group is padded."""
    edges = [0] + [t.first for t in tiers] + [num_layers]
    size = math.gcd(*(b - a for a, b in zip(edges, edges[1:])))
    return {layer: (t, (layer - t.first) // size) for t, end in zip(tiers, edges[2:]) for layer in range(t.first, end)}


def use_bounded_specs(attn_modules, tiers: list[Tier]) -> None:
    """Gives our model's attention modules of the bounded layers their spec instead of full attention
    (instance attributes: vLLM asks each module for its spec; the class is untouched)."""
    for layer, (tier, part) in layer_specs(tiers, len(attn_modules)).items():
        attn = attn_modules[layer]
        attn.get_kv_cache_spec = types.MethodType(
            lambda self, vllm_config, tier=tier, part=part: _bounded_spec(self, vllm_config, tier, part), attn)


def _bounded_spec(attn, vllm_config, tier: Tier, part: int):
    spec = type(attn).get_kv_cache_spec(attn, vllm_config)
    if type(spec) is not FullAttentionSpec:
        raise ValueError(f"visipruner: exit_by needs full-attention layers, {attn.layer_name} has "
                         f"{type(spec).__name__}; serve the config without exit_by")
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
    return BoundedAttentionSpec(**fields, keep_ratio=tier.keep_ratio, keep_tokens=tier.keep_tokens, part=part)
