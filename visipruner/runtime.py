"""The shared token-dropping runtime: hooks a method's decisions into a Hugging Face model.

How it stays a Hugging Face model (no class patching, no forks):
* attention goes through a function registered in transformers' ``AttentionInterface`` under
  ``visipruner_<original>``. The user's config is never written: while a handle is applied, each
  pruned attention module reads its config through a ``_RoutedConfig`` view that names that
  function for whatever implementation the config names now (so ``set_attn_implementation``
  between SDPA and eager is honoured, another implementation refused at the next call). Modules
  without an applied handle, and layers with nothing to change, call the original function (SDPA
  or eager) with the original arguments, so "pruning disabled" is bit-identical;
* a forward pre-hook on the multimodal model reads ``input_ids`` (where the image tokens are)
  and tells prefill from decode;
* a forward pre-hook on each decoder layer removes the tokens the method dropped after the
  previous layer (hidden states) and slices what the model passes to every layer (RoPE
  cos/sin, position ids, mask) to the tokens still present. Later layers therefore run on a
  shorter sequence and store shorter KV caches; kept tokens keep their original positions.

In decode steps each layer attends to its own cache, whatever length it has; new tokens take
positions after the unpruned prompt: the cache's layer 0 holds the whole prompt, so the model's
own position bookkeeping gives that, except after a method that selects before layer 0 (CDPruner,
DivPrune), where the positions generate() passes are required (a decode call without them is
refused).
"""

from __future__ import annotations

import copy
import functools
import sys
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from . import flops as F_
from .adapters import ModelAdapter, get_adapter
from .attention import (
    NEG_INF,
    masked_rows_without_visual,
    repeat_kv,
    shallow_decode_attention,
    shallow_stage_probabilities,
    text_rows_attention,
    visual_rows_layer0,
)
from .decisions import decide_layer, kept_rows, prefill_stats
from .methods.base import PromptLayout, PruningMethod

_ORIGINAL = {"sdpa": (sdpa_attention_forward, sdpa_mask), "eager": (eager_attention_forward, eager_mask)}


class _RoutedConfig:
    """A pruned attention module's view of its config (the user's, shared by every layer and by any
    other model built from it): every attribute read and written is the config's own, except that
    ``_attn_implementation`` names visipruner's dispatch for the implementation the config names now.
    It is also how the dispatch finds the module's handle (no global registry: an applied model is
    garbage-collected like any other, and ``copy.deepcopy`` gives the copy its own handle)."""

    __slots__ = ("config", "handle")

    def __init__(self, config, handle: "PruningHandle"):
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "handle", handle)

    @property
    def _attn_implementation(self):
        # routed only while the handle prunes a call (or a checkpoint recomputes one): anything that
        # inspects the module between calls, and every call with pruning disabled, sees the user's own
        impl, h = self.config._attn_implementation, self.handle
        if impl in _ORIGINAL and h.method.enabled and (h._in_call or h._state is not None or h._batch is not None):
            return f"visipruner_{impl}"
        return impl

    def __getattr__(self, name):  # only for names that are not the view's own
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "config"), name)

    def __setattr__(self, name, value):
        setattr(self.config, name, value)

    def __deepcopy__(self, memo):
        return _RoutedConfig(copy.deepcopy(self.config, memo), copy.deepcopy(self.handle, memo))

    def __reduce__(self):
        return _RoutedConfig, (self.config, self.handle)

    def __repr__(self) -> str:
        return f"_RoutedConfig({self.config!r})"


def _owner(module: nn.Module) -> "PruningHandle | None":
    """The handle whose pruning runs through ``module`` (an attention module), None if none."""
    cfg = module.__dict__.get("config")
    return cfg.handle if isinstance(cfg, _RoutedConfig) else None


def handle_of(model: nn.Module) -> "PruningHandle | None":
    """The handle applied to ``model`` (e.g. to a ``copy.deepcopy`` of an applied model, which has its
    own), or None."""
    for m in model.modules():
        handle = _owner(m)
        if handle is not None:
            return handle
    return None


# Under torch.compile, where decisions are taken (the model's hooks, a prefill's layer inputs and attention:
# data-dependent shapes, Python control flow on tensor values) the runtime runs eagerly, a graph break,
# so no graph ever holds one prompt's decisions; decode steps have no host reads and are traced.
_eager = functools.partial(
    torch.compiler.disable, recursive=True,
    reason="visipruner takes its pruning decisions eagerly (data-dependent shapes): compile without fullgraph=True")


def _family_eager(module):
    """The eager attention function of the module's own modeling file (softcapping etc.)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", eager_attention_forward)


def _make_dispatch(name, original):
    def dispatch(module, query, key, value, attention_mask, **kwargs):
        fn = _family_eager(module) if name == "eager" else original
        handle = _owner(module)
        if handle is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        return handle._attention(module, query, key, value, attention_mask, fn, **kwargs)

    return dispatch


for _name, (_attn, _mask) in _ORIGINAL.items():
    AttentionInterface.register(f"visipruner_{_name}", _make_dispatch(_name, _attn))
    AttentionMaskInterface.register(f"visipruner_{_name}", _mask)


def _gather_tokens(t: torch.Tensor, index: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """``t`` (..., B or 1, N, ...) with its token axis ``dim`` taken at ``index`` (B, W) per batch row."""
    dim = dim % t.dim()
    b_dim = dim - 1
    shape = list(t.shape)
    shape[b_dim] = index.shape[0]
    t = t.expand(*shape)
    view = [1] * t.dim()
    view[b_dim], view[dim] = index.shape
    idx = index.view(view).expand(*[s if i != dim else index.shape[1] for i, s in enumerate(shape)])
    return t.gather(dim, idx)


def _visibility(mask, n_q: int, n_k: int) -> torch.Tensor | None:
    """The (n_q, n_k) bool "query sees key" matrix of a batch-1 attention mask as the model built it
    (bool for SDPA, additive float for eager), or None when there is none (plain causal)."""
    if not isinstance(mask, torch.Tensor):
        return None
    m = mask[0, 0] if mask.dim() == 4 else mask
    m = m[-n_q:, -n_k:]
    if m.dtype == torch.bool:
        return m
    return m > torch.finfo(m.dtype).min / 2


def _carries_visual_features(kwargs) -> bool:
    """Whether a call brings visual features for its visual tokens (pixels, or encoder outputs generate()
    computed), i.e. its visual tokens are images or videos, not generated ids that equal a visual token."""
    if any(isinstance(kwargs.get(k), torch.Tensor) for k in ("pixel_values", "pixel_values_videos")):
        return True
    encoded = kwargs.get("mm_encoder_outputs")
    return isinstance(encoded, dict) and any(v is not None for v in encoded.values())


def _pruned_elsewhere(cache) -> bool:
    """Whether a cache's full-attention layers hold different numbers of tokens (a pruned prompt)."""
    lengths = {layer.keys.shape[-2] for layer in getattr(cache, "layers", ())
               if not getattr(layer, "is_sliding", False) and getattr(layer, "keys", None) is not None}
    return len(lengths) > 1


@dataclass
class PruneStats:
    """What happened to the latest prompt: its prefill and the decode steps after it."""

    prompt_length: int = 0
    num_visual_tokens: int = 0
    num_images: int = 0  # image spans (an image, or one tile of a tiled image)
    num_frames: int = 0  # video frames
    pruning_applied: bool = False
    fusion_layer: int | None = None
    exit_layer: int | None = None
    critical_tokens: list[int] = field(default_factory=list)
    visual_tokens_per_layer: list[int] = field(default_factory=list)  # as executed in prefill
    tokens_per_layer: list[int] = field(default_factory=list)  # sequence length per layer in prefill
    prefill_flops: int = 0
    dense_prefill_flops: int = 0
    prefill_flops_fastv: int = 0  # FastV's formula on the executed lengths
    dense_prefill_flops_fastv: int = 0
    vision_flops: int = 0  # vision tower + projector for this prompt's images (not in the prefill ratios)
    dense_vision_flops: int = 0  # the same with the projector on every patch (differs for VisionZip)
    padding_flops: int = 0  # prefill work on the padding a batch gives this row (not in prefill_flops)
    # per layer, the original positions (in this row's unpadded prompt) of the tokens that layer ran on, in
    # row order: rows of output_attentions[i] / output_hidden_states[i + 1] (a batch row: its last len() slots)
    layer_positions: list[torch.Tensor] = field(default_factory=list, repr=False)
    decode_flops: list[int] = field(default_factory=list)  # per decode step
    dense_decode_flops: list[int] = field(default_factory=list)
    method: dict = field(default_factory=dict)  # method-specific extras (e.g. min cos per layer)

    @property
    def avg_visual_tokens(self) -> float:
        v = self.visual_tokens_per_layer
        return sum(v) / len(v) if v else 0.0

    @property
    def prefill_flops_ratio(self) -> float:
        return self.prefill_flops / self.dense_prefill_flops if self.dense_prefill_flops else 1.0

    def kv_cache_tokens(self) -> int:
        """Prompt tokens held in the KV cache, summed over layers."""
        return sum(self.tokens_per_layer)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "layer_positions"}
        d["avg_visual_tokens"] = self.avg_visual_tokens
        d["prefill_flops_ratio"] = self.prefill_flops_ratio
        return d


class _PromptState:
    """Per-prompt bookkeeping while a prompt is prefilled and decoded."""

    def __init__(self, layout: PromptLayout, num_layers: int, device, method: PruningMethod | None = None,
                 extra: int = 0, replay: dict | None = None):
        self.layout = layout
        self.method = method  # this prompt's decision logic (each batch row has its own)
        # tokens the call carries after the prompt (draft tokens being verified, tokens generated
        # without a cache): text queries like decode steps' tokens, never removed, never deciding
        self.extra = extra
        self.replay = replay  # layer -> (keep, merges) recorded from this prompt's prefill: replayed, not decided
        self.decisions: dict[int, tuple] = {}  # layer -> (keep, merges) this prefill took
        self.stats: PruneStats | None = None  # this prompt's prefill (decode steps append their FLOPs)
        self.ids: torch.Tensor | None = None  # the caller's (1, n) input_ids of the prompt
        self.continues: _PromptState | None = None  # a cacheless generate() step: the prompt it recomputes
        self.positions = torch.arange(layout.length + extra, device=device)  # original positions in the sequence
        vis = torch.full((layout.length + extra,), -1, dtype=torch.long, device=device)
        vis[layout.visual_positions] = torch.arange(layout.num_visual, device=device)
        self.visual_ids = vis  # visual id of each token in the sequence, -1 for text
        self.present = torch.arange(layout.num_visual, device=device)  # visual ids present, in sequence order
        self.layer_visual_counts: list[int] = [layout.num_visual] * num_layers  # host-side: no reads to count
        self.pending_keep: torch.Tensor | None = None
        self.pending_merges: list[tuple[int, list[int]]] = []
        self.layer_text_rows: list[int] = [0] * num_layers  # text rows whose attention a method read
        self.layer_positions: list[torch.Tensor | None] = [None] * num_layers
        self.layer_visual_ids: list[torch.Tensor | None] = [None] * num_layers
        self.layer_modes: list[str | None] = [None] * num_layers
        self.layer_influence: list[tuple[int, int] | None] = [None] * num_layers  # (n_keys, n_visual)
        self.prefilled = False
        self.decode_positions: torch.Tensor | None = None  # positions of this decode step's queries
        self.decode_past = 0  # host-side: tokens before this decode step (prompt + generated)
        self.decode_layers: list[_DecodeLayer] | None = None  # fixed once the prompt is prefilled
        self.shallow_rows = None  # (first, last visual position, text rows after the first), once per prompt
        self.visual_list: list[bool] | None = None  # the unpruned prompt's visual mask on the host (FLOPs)
        self.dense_offset = 0  # tokens removed before the language model (VisionZip-like methods)
        self.original_visual = layout.num_visual
        self.reduced_prompt = False
        self.layer_input: torch.Tensor | None = None  # hidden states entering the current layer
        self.merge_values: list[torch.Tensor] | None = None  # layer-0 values of each span's first token
        self.layer_counts: list[tuple[int, int, str | None]] | None = None  # per layer after prefill: (tokens,
        # visual tokens, shallow mode), for decode FLOPs

    def pruned(self) -> bool:
        return self.positions.numel() < self.layout.length + self.extra

    def prompt_rows(self) -> int:
        """How many of the current layer's tokens are the prompt's (the extra tokens come last)."""
        return self.positions.numel() - self.extra

    def end_extra(self) -> None:
        """After a prefill with extra tokens: keep the prompt's part of the per-layer record (what the
        decode bookkeeping and the stats describe); the extra tokens are in the cache as generated ones."""
        for layer, pos in enumerate(self.layer_positions):
            if pos is not None:  # the extra tokens are never removed and come last: a slice, no device read
                n = pos.numel() - self.extra
                self.layer_positions[layer], self.layer_visual_ids[layer] = pos[:n], self.layer_visual_ids[layer][:n]
        self.extra = 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep the tokens at ``rows`` of the current sequence (a decision: its one host read is here)."""
        self.positions, self.visual_ids = self.positions[rows], self.visual_ids[rows]
        self.present = self.visual_ids[self.visual_ids >= 0]


@dataclass
class _DecodeLayer:
    """What a decode step needs of one layer's cache, fixed once the prompt is prefilled, so a step reads
    nothing back from the device and takes no Python branch on tensor values."""

    mode: str | None  # the shallow-stage mode of decode queries in this layer
    kept: torch.Tensor  # original positions of the prompt tokens this layer's cache holds
    n_kept: int
    visual: torch.Tensor | None = None  # (capacity,) bool: cache entries that are visual (prompt part, then False)
    onehot: torch.Tensor | None = None  # (n_kept, spans) float: 1 where a prompt entry belongs to span g (merge)
    firsts: torch.Tensor | None = None  # (1, Hkv, spans, d) float: layer 0's value of each span's first token

    def visual_columns(self, n: int) -> torch.Tensor:
        """The first ``n`` entries of ``visual``, grown (doubling) when generation outruns it."""
        if n > self.visual.numel():
            self.visual = F.pad(self.visual, (0, max(n, 2 * self.visual.numel()) - self.visual.numel()))
        return self.visual[:n]


class _Batch:
    """A left-padded batch being prefilled and decoded. Every row is pruned as if alone: its own
    method, decisions and token removal. A row's tokens are always the right-aligned tail of its
    batch row; when rows keep different numbers of tokens the layer's inputs are repacked (gathered)
    to the longest row, and the padding in front of shorter rows is masked out of every attention."""

    def __init__(self, rows, lengths, padded: int, num_layers: int):
        self.rows: list[_PromptState | None] = rows  # None: a row without visual tokens (untouched)
        self.prompt_lengths = list(lengths)  # each row's unpadded prompt length
        self.lengths = list(lengths)  # each row's tokens in the current layer
        self.padded = padded  # the caller's padded length
        self.width = padded  # the current layer's sequence length
        self.changed = False  # a row lost tokens: layers from here on get repacked inputs
        self.layer_widths: list[int] = [padded] * num_layers
        self.layer_lengths: list[list[int]] = [list(lengths)] * num_layers
        self.layer_changed: list[bool] = [False] * num_layers
        self.prefilled = False
        self.generated = 0  # tokens generated before the current decode step
        self.key_layout: dict = {}  # layer -> per-row cache layout (decode); "firsts": the merge values
        self.reduced_mask: torch.Tensor | None = None  # a prompt reduced before the LM: its (B, padded) mask
        self.caller_padded = padded  # the caller's padded length (differs when the prompt was reduced)
        self.stats: list[PruneStats] = []  # each row's prefill (decode steps append their FLOPs)
        self.ids: torch.Tensor | None = None  # the caller's input_ids of the prompt
        self.continues: _Batch | None = None  # a cacheless generate() step: the batch it recomputes

    def slots(self, layer: int, device, caller: bool) -> torch.Tensor:
        """(rows, width) of ``layer``'s input: each slot's token as a position in its row's own unpadded
        prompt (``caller=False``) or in the caller's padded row (``caller=True``); -1 for padding."""
        W = self.layer_widths[layer]
        out = torch.full((len(self.rows), W), -1, dtype=torch.long, device=device)
        for r, st in enumerate(self.rows):
            pos = (torch.arange(self.prompt_lengths[r]) if st is None else st.layer_positions[layer]).to(device)
            out[r, W - pos.numel():] = pos + (self.padded - self.prompt_lengths[r] if caller else 0)
        return out


class PruningHandle:
    """A method applied to a model. Undo with ``remove()`` or use as a context manager."""

    def __init__(self, model: nn.Module, method: PruningMethod, adapter: ModelAdapter):
        self.model = model
        self.method = method
        self.adapter = adapter
        self.dims = F_.Dims.from_config(adapter.text_config)
        self.vision_dims = adapter.vision_dims()  # None: the family's vision FLOPs are not modelled
        self.last_stats: PruneStats | None = None
        self.batch_stats: list[PruneStats] = []  # one per row of the latest call, in batch order
        self._state: _PromptState | None = None  # the prompt (batch 1) the current call belongs to, if pruned
        self._batch: _Batch | None = None  # the batch the current call belongs to, if pruned
        # cache -> the prompt or batch it holds: decode steps find their prompt by the cache they pass
        # (several generations may interleave: a model assisting itself, chats resumed from their cache)
        self._prompts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._uncached: tuple | None = None  # (mm_encoder_outputs, prompt) of the latest cacheless prompt
        self._logits_to_keep = None  # the outer model's logits_to_keep for the multimodal call it makes
        self._hooks = []
        self._labels = self._label_slots = None  # a call's labels, and where its kept tokens stand (pruned)
        self._in_call = False  # inside a multimodal forward (attention outside one: a checkpoint's recompute)
        self._replaying = False  # recomputing a prefill layer: same attention, no decisions
        self._num_layers = len(adapter.layers)
        self._attached = False
        self._attach()

    # ----------------------------------------------------------------------------- lifecycle
    def _attach(self) -> None:
        a = self.adapter
        if hasattr(self.method, "attach"):  # methods that watch other modules (e.g. the vision tower);
            self._hooks.extend(self.method.attach(a))  # first: one that refuses the model leaves it untouched
        if a.model is not a.multimodal:
            self._hooks.append(a.model.register_forward_pre_hook(self._on_outer_call, with_kwargs=True))
        if a.model is not a.multimodal:  # labels: the loss over the kept tokens (the model's would not fit)
            self._hooks.append(a.model.register_forward_pre_hook(self._take_labels, with_kwargs=True))
            self._hooks.append(a.model.register_forward_hook(self._loss_on_kept, with_kwargs=True))
        self._hooks.append(a.multimodal.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._hooks.append(a.multimodal.register_forward_hook(self._on_model_return, with_kwargs=True))
        for i, layer in enumerate(a.layers):
            # hooks are bound methods (partials of them), so a deepcopy of the model hooks its own copy
            hook = functools.partial(self._layer_hook, i)
            self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            attn = a.attention_module(layer)
            attn.config = _RoutedConfig(attn.config, self)
        self._hooks.extend(a.install(self))  # the family's own hooks (Qwen3-VL's deepstack)
        self._attached = True

    @property
    def _original_impl(self) -> str:
        """The attention implementation the user's config names now ('sdpa' or 'eager' while pruning acts)."""
        return self.adapter.text_config._attn_implementation

    def remove(self) -> None:
        """Restore the model exactly as it was."""
        if not self._attached:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for layer in self.adapter.layers:
            attn = self.adapter.attention_module(layer)
            if isinstance(attn.__dict__.get("config"), _RoutedConfig):
                attn.config = attn.config.config
        self._state = None
        self._attached = False

    def __enter__(self) -> "PruningHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------ for family adapters
    def pruned_prefill(self):
        """The prompt (batch 1) or batch whose prefill the runtime is pruning now, None otherwise (no
        visual tokens, pruning disabled, decode steps). Compare by identity to tell prefills apart."""
        if self._batch is not None:
            return None if self._batch.prefilled else self._batch
        st = self._state
        return None if st is None or st.prefilled else st

    def layer_slots(self, layer: int) -> torch.Tensor:
        """Where each token of ``layer``'s input (as this prefill ran it: dropped, right-aligned, repacked)
        stands in the caller's ``input_ids``: a (batch, tokens) tensor of positions in the caller's padded
        rows, -1 for slots the runtime added when repacking rows to one width. Call it from a layer's
        hooks during a pruned prefill (e.g. to add per-token features to that layer's output)."""
        bt = self._batch
        if bt is None:
            return self._state.layer_positions[layer][None]
        return bt.slots(layer, next(st.positions.device for st in bt.rows if st is not None), caller=True)

    # ------------------------------------------------------------------------------- hooks
    def _on_outer_call(self, module, args, kwargs):
        self._logits_to_keep = kwargs.get("logits_to_keep")  # read by the multimodal model's call just after

    def _on_model_call(self, module, args, kwargs):
        if not self.method.enabled and torch.compiler.is_compiling():
            return None  # pruning disabled: no bookkeeping inside a compiled graph (fullgraph=True traces as unhooked)
        return self._model_call(module, args, kwargs)

    @_eager
    def _model_call(self, module, args, kwargs):
        self._in_call = True
        impl = self._original_impl
        if impl not in _ORIGINAL and self.method.enabled:  # the layers would drop tokens its attention never sees
            raise ValueError(f"the attention implementation is now {impl!r} (changed after visipruner.apply); pruning "
                             "needs 'sdpa' or 'eager': model.set_attn_implementation('sdpa'), or handle.remove() first")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        logits_to_keep, self._logits_to_keep = self._logits_to_keep, None
        self._state = self._batch = None  # set below if this call belongs to a pruned prompt
        if input_ids is None:
            if self.method.enabled and past == 0:
                raise ValueError("visipruner needs input_ids (to find the visual tokens); got inputs_embeds only")
            return None
        adapter = self.adapter
        if past > 0:  # a continuation of the prompt this cache holds: decode steps, verified drafts, a later turn
            # (no host reads unless the call brings visual features: a decode step must not stall a GPU)
            if self.method.enabled and _carries_visual_features(kwargs):
                visual = adapter.visual_mask(input_ids)
                if bool(visual.any()):
                    raise ValueError(
                        f"{int(visual.sum())} visual tokens arrive in a KV cache that already holds {past} tokens (a "
                        "later chat turn or a prefill chunk); visipruner prunes visual tokens in a prompt's first "
                        "prefill only: pass the whole conversation with all its images and no past_key_values (or a "
                        "fresh cache)")
            # (a generated id that happens to be an image token has no features: it is text here)
            state = self._prompts.get(cache)
            if state is None:
                if self.method.enabled and _pruned_elsewhere(cache):
                    raise ValueError("this KV cache holds a prompt pruned by another visipruner handle (layers hold "
                                     "different numbers of tokens); continue it under the handle that prefilled it")
                return None  # a cache this handle did not prefill with pruning: nothing to do
            bt = state if isinstance(state, _Batch) else None
            self._check_decode_positions(state, kwargs)
            # past counts layer 0's cache, which holds fewer prompt tokens after a selection before layer 0
            # (CDPruner, DivPrune): the tokens before this step, counted as in an unpruned cache
            held = bt.layer_widths[0] if bt is not None else int(state.layer_positions[0].numel())  # no device read
            full = bt.padded if bt is not None else state.layout.length
            past = past - held + full
            # a cache may be cropped back into the prompt's closing text (an assistant re-feeding the prompt's last
            # token), which every layer holds, but not into the tokens that layers hold differently
            if bt is not None or state.reduced_prompt:
                needed = full  # what the cache holds of the prompt
            else:
                needed = max(e for _, e in state.layout.image_spans)  # python ints: no device sync per step
            if past < needed:
                raise ValueError(f"the KV cache holds {past} tokens, fewer than the {needed} of the pruned prompt it was "
                                 "built for (it was cropped into the pruned tokens): prefill the prompt again")
            if bt is not None:
                if input_ids.shape[0] != len(bt.rows):
                    return None
                self._batch = bt
                bt.generated = past - bt.padded
                for r, st in enumerate(bt.rows):
                    if st is not None:
                        start = st.decode_past = bt.prompt_lengths[r] + bt.generated
                        st.decode_positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
                if bt.reduced_mask is None:
                    return None
                return args, self._reduced_decode_call(kwargs, bt.reduced_mask, bt.caller_padded, bt.generated,
                                                       input_ids.shape[1])
            st = self._state = state
            st.decode_past = past
            st.decode_positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
            if st.reduced_prompt:
                n = st.layout.length
                return args, self._reduced_decode_call(
                    kwargs, torch.ones(1, n, dtype=torch.long, device=input_ids.device), n + st.dense_offset,
                    past - n, input_ids.shape[1])
            return None
        # prefill: a new prompt, or (no cache) the same generate() call recomputing its prompt and tokens
        visual = adapter.visual_mask(input_ids)
        has_visual = bool(visual.any())
        encoder_outputs = kwargs.get("mm_encoder_outputs")
        continued = self._uncached_continuation(input_ids, encoder_outputs)
        if continued is not None:
            return self._continue_uncached(continued, input_ids, kwargs, args)
        if encoder_outputs is not None and self._uncached is not None and self._uncached[0] is encoder_outputs:
            return None  # a cacheless step of a prompt with nothing to prune: its stats stay
        self.last_stats = None
        self.batch_stats = []
        self._uncached = None
        if not self.method.enabled or not has_visual:
            if encoder_outputs is not None and cache is None:
                self._uncached = (encoder_outputs, None)
            mask = kwargs.get("attention_mask")
            lengths = (mask.sum(-1).tolist() if isinstance(mask, torch.Tensor) and mask.dim() == 2
                       else [int(input_ids.shape[-1])] * input_ids.shape[0])
            self.batch_stats = [PruneStats(prompt_length=int(n)) for n in lengths]
            self.last_stats = self.batch_stats[0]
            return None
        if any(isinstance(layer, StaticLayer) for layer in getattr(cache, "layers", ())):
            # a static cache writes each token at its position's slot; a pruned layer holds fewer tokens
            raise ValueError(f"pruning needs a dynamic KV cache (pruned layers cache fewer tokens); got "
                             f"{type(cache).__name__}: generate without cache_implementation='static'")
        mask = kwargs.get("attention_mask")
        batched = input_ids.shape[0] > 1 or (isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()))
        caller_padded = int(input_ids.shape[1])  # the prompt as passed (the dense figures count it)
        changed = hasattr(self.method, "reduce_prompt")  # methods acting before the language model
        # generate() verifying draft tokens (assisted / prompt-lookup decoding) prefills the prompt and the
        # drafts in one call and asks for the logits from the prompt's last token on: the prompt ends there
        drafts = (logits_to_keep - 1 if isinstance(logits_to_keep, int) and logits_to_keep > 1 and not batched
                  and not changed and encoder_outputs is not None and logits_to_keep <= caller_padded else 0)
        if drafts and not bool(visual[0, : caller_padded - drafts].any()):
            drafts = 0  # no visual token before the drafts: not a prompt with its drafts
        caller_ids = input_ids
        if changed:
            lengths = self._row_lengths(input_ids, mask) if batched else [caller_padded]
            visual = [int(adapter.visual_mask(input_ids[r, caller_padded - n:]).sum()) for r, n in enumerate(lengths)]
            kwargs = self.method.reduce_prompt(adapter.multimodal, adapter.image_token_id, kwargs)
            input_ids = kwargs["input_ids"]
        if batched:
            bt = self._batch = self._start_batch(input_ids, kwargs)
            bt.ids = caller_ids
            if not changed:
                return None
            bt.reduced_mask, bt.caller_padded = kwargs["attention_mask"], caller_padded
            for r, st in enumerate(bt.rows):
                if st is not None:
                    st.dense_offset, st.original_visual = lengths[r] - bt.prompt_lengths[r], visual[r]
                    st.reduced_prompt = True
            return args, kwargs
        ids = input_ids[0, : input_ids.shape[1] - drafts]
        st = self._prompt_state(ids, adapter.visual_mask(ids), kwargs, self.method, extra=drafts)
        st.ids = caller_ids
        if changed:
            st.dense_offset, st.original_visual, st.reduced_prompt = caller_padded - st.layout.length, visual[0], True
        self._state = st
        return (args, kwargs) if changed else None

    def _uncached_continuation(self, input_ids, encoder_outputs):
        """The prompt this cacheless call recomputes with tokens generated after it, or None (a new prompt).

        generate() without a cache recomputes the prompt and every generated token at each step, and hands
        each step the *same* ``mm_encoder_outputs`` object it encoded the prompt's images into once: that
        object, and the prompt's ids as the call's leading ids, identify the prompt. A plain forward call
        (``pixel_values``) always starts a new prompt."""
        if (encoder_outputs is None or self._uncached is None or self._uncached[0] is not encoder_outputs
                or self._uncached[1] is None):
            return None
        state = self._uncached[1]
        prompt = state.ids
        if (input_ids.shape[0] != prompt.shape[0] or input_ids.shape[1] <= prompt.shape[1]
                or not torch.equal(input_ids[:, : prompt.shape[1]], prompt)):
            raise ValueError("this call passes the mm_encoder_outputs of an earlier prompt but does not continue its "
                             "input_ids; pass the images again (pixel_values) to start a new prompt")
        return state

    def _continue_uncached(self, prompt, input_ids, kwargs, args):
        """A cacheless step of generate(): the prompt's recorded decisions replayed over the prompt and the
        tokens generated so far (text queries after it), which is what a cached decode step computes."""
        if hasattr(self.method, "reduce_prompt"):
            raise ValueError(f"use_cache=False generation is not supported with {self.method.name}, which reduces the "
                             "prompt before the language model: generate with use_cache=True")
        extra = input_ids.shape[1] - prompt.ids.shape[1]
        if isinstance(prompt, _Batch):
            rows = [None if st is None else self._replay_state(st, extra) for st in prompt.rows]
            self._batch = bt = _Batch(rows, [n + extra for n in prompt.prompt_lengths], input_ids.shape[1],
                                      self._num_layers)
            bt.continues = prompt
        else:
            self._state = self._replay_state(prompt, extra)
        return None

    def _replay_state(self, st: _PromptState, extra: int) -> _PromptState:
        out = _PromptState(st.layout, self._num_layers, st.positions.device, st.method, extra=extra,
                           replay=st.decisions)
        out.continues = st
        return out

    @staticmethod
    def _check_decode_positions(state, kwargs) -> None:
        """A method that selected before layer 0 left layer 0's KV cache shorter than the prompt, and a
        model counts new tokens' positions from that cache unless it is given them: refuse that."""
        rows = [r for r in state.rows if r is not None] if isinstance(state, _Batch) else [state]
        shortened = any(getattr(r.method, "acts_at_input", False) and r.layer_positions[0] is not None
                        and r.layer_positions[0].numel() < r.layout.length for r in rows)
        if shortened and kwargs.get("position_ids") is None:
            raise ValueError(f"{rows[0].method.name} removed visual tokens before layer 0, so layer 0's KV cache is "
                             "shorter than the prompt and positions cannot be counted from it: pass position_ids (and "
                             "the attention_mask) to each decode step, as generate() does, or use generate()")

    def _on_model_return(self, module, args, kwargs, output):
        if not self.method.enabled and torch.compiler.is_compiling():
            return None
        return self._model_return(module, args, kwargs, output)

    @_eager
    def _model_return(self, module, args, kwargs, output):
        self._in_call = False
        if self._labels is not None and self.pruned_prefill() is not None:
            self._label_slots = self.layer_slots(self._num_layers - 1)
        cache = getattr(output, "past_key_values", None)
        bt = self._batch
        if bt is not None:
            if not bt.prefilled:
                bt.prefilled = True
                stats = [self._prefill_stats(st) if st is not None else PruneStats(prompt_length=n)
                         for st, n in zip(bt.rows, bt.prompt_lengths)]
                for r, s in enumerate(stats):
                    s.padding_flops = self._padding_flops(bt, r)
                if bt.continues is not None:  # a cacheless step: what it recomputed, as that step's work
                    for s, done in zip(bt.continues.stats, stats):
                        s.decode_flops.append(done.prefill_flops)
                        s.dense_decode_flops.append(done.dense_prefill_flops)
                    return None
                bt.stats = self.batch_stats = stats
                self.last_stats = stats[0]
                self._remember(bt, cache, kwargs)
            else:
                for st, s in zip(bt.rows, bt.stats):
                    if st is not None and st.decode_positions is not None:
                        f, dense = self._decode_flops(st)
                        s.decode_flops.append(f)
                        s.dense_decode_flops.append(dense)
                        st.decode_positions = None
            return None
        st = self._state
        if st is None:
            return None
        if not st.prefilled:
            st.prefilled = True
            if st.continues is not None:  # a cacheless step: what it recomputed, as that step's work
                done = self._prefill_stats(st)
                st.continues.stats.decode_flops.append(done.prefill_flops)
                st.continues.stats.dense_decode_flops.append(done.dense_prefill_flops)
                return None
            extra = st.extra
            st.end_extra()
            st.decode_layers = self._decode_plan(st)  # of the prompt's part of each layer's cache
            st.stats = self.last_stats = self._prefill_stats(st)
            self.batch_stats = [self.last_stats]
            self._remember(st, cache, kwargs)
            if not extra:
                return None
            # the draft tokens after the prompt, counted as the decode step they stand for
            st.decode_past = st.layout.length
            st.decode_positions = torch.arange(st.layout.length, st.layout.length + extra, device=st.positions.device)
        if st.decode_positions is not None:
            f, dense = self._decode_flops(st)
            st.stats.decode_flops.append(f)
            st.stats.dense_decode_flops.append(dense)
            st.decode_positions = None
        return None

    def _remember(self, state, cache, kwargs) -> None:
        """Which prompt a cache holds (its decode steps find it by the cache), or, with no cache, which
        prompt a cacheless generate() step continues (see ``_uncached_continuation``)."""
        if cache is not None:
            self._prompts[cache] = state
        elif kwargs.get("mm_encoder_outputs") is not None:
            self._uncached = (kwargs["mm_encoder_outputs"], state)

    def _take_labels(self, module, args, kwargs):
        """The outer model's ``labels`` are kept from its own loss (logits cover the kept tokens only) and
        used by ``_loss_on_kept`` after the call."""
        self._labels = self._label_slots = None
        if kwargs.get("labels") is None or not self.method.enabled:
            return None
        if hasattr(self.method, "reduce_prompt"):
            raise ValueError(f"labels= with {self.method.name}, which removes tokens before the language model, is not "
                             "supported: compute the loss without pruning (handle.remove()), or use an in-model method")
        self._labels = kwargs["labels"]
        return args, dict(kwargs, labels=None)

    def _loss_on_kept(self, module, args, kwargs, output):
        """The causal-LM loss over the rows the model returned: each kept position p predicts the caller's
        ``labels[p + 1]`` (text tokens are never removed), with the model's own loss function."""
        labels, slots = self._labels, self._label_slots
        self._labels = self._label_slots = None
        if labels is None:
            return None
        logits = output["logits"] if isinstance(output, dict) else output[0]
        targets = F.pad(labels, (0, 1), value=-100)[..., 1:]  # what each original position predicts
        if slots is not None:  # a pruned prefill: the rows are the last layer's tokens
            slots = slots.to(labels.device)[:, -logits.shape[1]:]
            targets = targets.gather(1, slots.clamp(min=0)).masked_fill(slots < 0, -100)
        else:
            targets = targets[:, -logits.shape[1]:]
        loss = module.loss_function(logits=logits, labels=None, shift_labels=targets.contiguous(),
                                    vocab_size=logits.shape[-1], num_items_in_batch=kwargs.get("num_items_in_batch"))
        if isinstance(output, dict):
            return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})
        return (loss,) + tuple(output)

    def _layer_hook(self, idx: int, module, args, kwargs):
        if self._batch is not None:
            return None if self._batch.prefilled else self._batch_layer_inputs(idx, self._batch, args, kwargs)
        st = self._state
        if st is None:
            return None
        if st.prefilled:
            return None  # decode: each layer's attention builds the mask for its own cache
        return self._prefill_layer_inputs(idx, st, args, kwargs)

    @_eager
    def _prefill_layer_inputs(self, idx: int, st: _PromptState, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if idx == 0:
            self._select_at_input(st, hidden[0])
        if st.pending_merges:
            hidden = self._merge(hidden, st)
        if st.pending_keep is not None:
            keep = kept_rows(st)
            rows = keep.nonzero().squeeze(-1)
            hidden = hidden.index_select(1, rows)
            st.keep_rows(rows)
            st.pending_keep = None
        st.layer_positions[idx], st.layer_visual_ids[idx] = st.positions, st.visual_ids
        st.layer_visual_counts[idx] = st.present.numel()
        st.layer_input = hidden
        if not st.pruned():
            return None
        pos = st.positions
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (cos.index_select(-2, pos), sin.index_select(-2, pos))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"].index_select(-1, pos)
        m = kwargs.get("attention_mask")
        if isinstance(m, torch.Tensor):
            kwargs["attention_mask"] = m.index_select(-2, pos).index_select(-1, pos)
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    @staticmethod
    def _select_at_input(st: _PromptState, hidden: torch.Tensor) -> None:
        """Methods choosing before the language model (CDPruner, DivPrune): they see the prompt's
        layer-0 input (``hidden``, (n, d), the row's own tokens) and their choice is removed before
        layer 0 runs. The instruction: the prompt's text tokens after the first visual token (tokens
        after the prompt, drafts or tokens generated without a cache, take no part; a recomputed
        prompt replays the choice its prefill made, recorded as layer -1's decision)."""
        if not getattr(st.method, "acts_at_input", False):
            return
        if st.replay is not None:
            st.pending_keep = st.replay.get(-1, (None, []))[0]
            return
        n = st.prompt_rows()
        is_vis = st.visual_ids[:n] >= 0
        first = int(st.layout.visual_positions[0])
        after = ~is_vis & (torch.arange(n, device=is_vis.device) > first)
        text = after if bool(after.any()) else ~is_vis
        st.pending_keep = st.method.select_at_input(hidden[:n][is_vis], hidden[:n][text]).to(st.visual_ids.device)
        st.decisions[-1] = (st.pending_keep, [])

    @staticmethod
    def _merge(hidden: torch.Tensor, st: _PromptState) -> torch.Tensor:
        row_of = {int(v): i for i, v in enumerate(st.visual_ids.tolist()) if v >= 0}
        hidden = hidden.clone()
        for dest, sources in st.pending_merges:
            rows = torch.tensor([row_of[dest]] + [row_of[s] for s in sources], device=hidden.device)
            hidden[:, row_of[dest]] = hidden.index_select(1, rows).float().mean(1).to(hidden.dtype)
        st.pending_merges = []
        return hidden

    # --------------------------------------------------------------------------- attention
    def _attention(self, module, q, k, v, mask, original, **kwargs):
        if not self._in_call:  # gradient checkpointing recomputes a layer in backward, after the forward
            return self._recompute(module, q, k, v, mask, original, **kwargs)
        st = self._state
        layer = module.layer_idx
        if self._batch is not None:
            scale = kwargs.get("scaling") or module.head_dim**-0.5
            if self._batch.prefilled:
                return self._batch_decode_attention(module, q, k, v, mask, original, scale, layer, self._batch, **kwargs)
            return self._batch_attention(module, q, k, v, mask, original, scale, layer, self._batch, **kwargs)
        if st is None:
            return original(module, q, k, v, mask, **kwargs)
        scale = kwargs.get("scaling") or module.head_dim**-0.5
        if st.prefilled:  # decode step
            if st.decode_positions is None:
                return original(module, q, k, v, mask, **kwargs)
            if st.decode_layers is None:
                st.decode_layers = self._decode_plan(st)
            return self._decode_attention(module, q, k, v, mask, original, scale, st, layer, **kwargs)
        return self._prefill_attention(module, q, k, v, mask, original, scale, self.method.shallow_mode(layer), st,
                                       layer, **kwargs)

    @_eager
    def _prefill_attention(self, module, q, k, v, mask, original, scale, mode, st, layer, **kwargs):
        st.layer_modes[layer] = mode
        visible = _visibility(mask, q.shape[2], k.shape[2])  # None: plain causal
        if mode is None:
            out = original(module, q, k, v, mask, **kwargs)
        else:
            out = self._shallow_prefill(module, q, k, v, scale, mode, st, visible)
            if self._original_impl == "eager":  # eager attention returns its probabilities (output_attentions)
                out = (out[0], self._shallow_weights(q, k, scale, mode, st, visible).to(q.dtype))
        self._decide(module, q, k, v, scale, mode, st, visible, layer)
        return out

    @staticmethod
    def _shallow_weights(q, k, scale, mode, st, visible):
        """A shallow-stage prefill layer's probabilities (1, H, n, n), for eager's ``output_attentions``."""
        n = q.shape[2]
        ar = torch.arange(n, device=q.device)
        is_vis = st.visual_ids >= 0
        first = st.shallow_rows[1]  # read by _shallow_prefill, once per prompt
        if visible is None:
            visible = ar[None, :] <= ar[:, None]
        key_span = torch.full((n,), -1, dtype=torch.long, device=q.device)
        for g, (s, e) in enumerate(st.layout.image_spans):  # the sequence is unpruned in shallow layers
            key_span[s:e] = g
        text = ~is_vis & (ar > first)
        edited = (ar > first) if mode == "merge" else text
        return shallow_stage_probabilities(q, k, scale, visible, mode, edited, text, key_span,
                                           [s for s, _ in st.layout.image_spans])

    def _recompute(self, module, q, k, v, mask, original, **kwargs):
        """A prefill layer's attention again (gradient checkpointing's backward recompute), as the forward
        ran it: the state is put back to that layer's tokens and decisions are not retaken."""
        target = self._batch if self._batch is not None else self._state
        if target is None or not target.prefilled:
            return original(module, q, k, v, mask, **kwargs)
        layer = module.layer_idx
        rows = [self._state] if self._batch is None else [st for st in self._batch.rows if st is not None]
        saved = [(st.visual_ids, st.positions) for st in rows]
        bt = self._batch
        batch_saved = None if bt is None else (bt.lengths, bt.width, bt.changed)
        try:
            for st in rows:
                st.visual_ids, st.positions = st.layer_visual_ids[layer], st.layer_positions[layer]
            if bt is not None:
                bt.lengths, bt.width = bt.layer_lengths[layer], bt.layer_widths[layer]
                bt.changed = bt.layer_changed[layer]
            target.prefilled, self._replaying, self._in_call = False, True, True
            return self._attention(module, q, k, v, mask, original, **kwargs)
        finally:
            for st, (ids, pos) in zip(rows, saved):
                st.visual_ids, st.positions = ids, pos
            if bt is not None:
                bt.lengths, bt.width, bt.changed = batch_saved
            target.prefilled, self._replaying, self._in_call = True, False, False

    @torch.no_grad()  # decisions read the attention; they are not part of the model's computation graph
    def _decide(self, module, q, k, v, scale, mode, st, visible, layer) -> None:
        """One prompt's decision after ``layer`` (q, k, v: that prompt's rows only, batch 1), taken on the
        prompt's last token over the prompt's keys (extra tokens after the prompt take no part), or
        replayed from the prompt's own prefill."""
        if self._replaying:
            return
        decide_layer(st, layer, q, k, v, scale, module.num_key_value_groups, mode, visible)

    def _shallow_prefill(self, module, q, k, v, scale, mode, st, visible):
        """Stage-1 attention over the whole (unpruned) prompt; returns (b, n, H, d).

        ``visible`` (n, n) bool is the family's own mask (bidirectional image blocks, sliding
        windows) or None for plain causal attention, which takes the cheapest kernels."""
        is_vis = st.visual_ids >= 0
        n = q.shape[2]
        spans = st.layout.image_spans  # the sequence is unpruned in shallow layers
        ar = torch.arange(n, device=q.device)
        if st.shallow_rows is None or st.shallow_rows[0] != n:  # read once per prompt, not per shallow layer
            vis_idx = is_vis.nonzero().squeeze(-1)
            first, last = int(vis_idx[0]), int(vis_idx[-1])
            st.shallow_rows = (n, first, last, ((~is_vis) & (ar > first)).nonzero().squeeze(-1))
        _, first, last, text_rows = st.shallow_rows
        if mode == "merge":
            st.merge_values = [v[:, :, s : s + 1] for s, _ in spans]  # for decode steps (sliding caches)
        gqa = k.shape[1] != q.shape[1]
        if visible is None:
            out = torch.empty_like(q)
            if mode == "merge":
                groups = module.num_key_value_groups
                kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)
                for s, e in spans:
                    before = ar[:s]
                    out[:, :, s:e] = visual_rows_layer0(
                        q[:, :, s:e], kk, vv, scale, (s, e), before[is_vis[:s]], before[~is_vis[:s]]
                    )
                prefix = first + 1
            else:
                prefix = last + 1
            out[:, :, :prefix] = F.scaled_dot_product_attention(
                q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], is_causal=True, scale=scale, enable_gqa=gqa,
            )
        else:
            out = torch.empty_like(q)
            changed_visual = is_vis & (ar > first) if mode == "merge" else torch.zeros_like(is_vis)
            plain = ((ar <= first) | is_vis) & ~changed_visual
            rows = plain.nonzero().squeeze(-1)
            out[:, :, rows] = F.scaled_dot_product_attention(
                q.index_select(2, rows), k, v, attn_mask=visible.index_select(0, rows), scale=scale, enable_gqa=gqa)
            rows = changed_visual.nonzero().squeeze(-1)
            if rows.numel():
                groups = module.num_key_value_groups
                out[:, :, rows] = masked_rows_without_visual(
                    q.index_select(2, rows), repeat_kv(k, groups), repeat_kv(v, groups), scale,
                    visible.index_select(0, rows), is_vis)
        if text_rows.numel():  # (a shape: no read)
            out[:, :, text_rows] = text_rows_attention(
                q.index_select(2, text_rows), k, v, scale, text_rows, ar, spans,
                merge=(mode == "merge"), renormalise=(mode == "disable_renorm"),
                visible=None if visible is None else visible.index_select(0, text_rows),
            )
        return out.transpose(1, 2).contiguous(), None

    @_eager
    def _decode_plan(self, st: _PromptState) -> list[_DecodeLayer]:
        """Per layer, what decode steps need of its cache (positions, visual columns, span membership, the
        merge values), built once at the end of the prefill so that a step reads nothing from the device."""
        plan, spans = [], st.layout.image_spans
        for layer in range(self._num_layers):
            kept, vis = st.layer_positions[layer], st.layer_visual_ids[layer]
            mode = st.method.shallow_mode(layer)
            entry = _DecodeLayer(mode, kept, kept.numel())
            if mode is not None:
                entry.visual = F.pad(vis >= 0, (0, 256))  # room for 256 generated (text) entries, then grown
                if mode == "merge":
                    # span g's entries: by original position (a cache pruned before a shallow layer still works)
                    bounds = torch.tensor([b for span in spans for b in span], device=kept.device).view(-1, 2)
                    inside = (kept[:, None] >= bounds[:, 0]) & (kept[:, None] < bounds[:, 1])
                    entry.onehot = inside.float()
                    entry.firsts = torch.cat(st.merge_values, dim=2).float()
            plan.append(entry)
        return plan

    def _decode_attention(self, module, q, k, v, mask, original, scale, st, layer, **kwargs):
        """A decode step's queries against this layer's own cache, whatever it holds.

        The cache holds the prompt tokens this layer processed, then the generated ones, and a
        sliding-window cache only the last of those: the keys' original positions are the tail of
        that list. Visibility is decided by original positions (causal, and the layer's window).
        Everything is known on the host (the step's position, the layer's plan): no device reads."""
        plan = st.decode_layers[layer]
        n_prompt, new, K = st.layout.length, q.shape[2], k.shape[2]
        window = kwargs.get("sliding_window")
        if plan.mode is None and plan.n_kept == n_prompt and (mask is None or mask.shape[-1] == K):
            return original(module, q, k, v, mask, **kwargs)  # this layer's cache is the unpruned one
        if plan.mode is None and not window and new == 1:
            return original(module, q, k, v, None, **kwargs)  # one new token sees its whole cache
        # The keys this layer's cache would hold without a window: its prompt entries, then the generated tokens;
        # or, in a cache cropped back into the prompt's closing text (an assistant re-feeding it; the model call
        # checked the crop spares the visual tokens), the first of its prompt entries, the closing text's tail
        # being re-fed. Their positions: the first n_keys of (kept prompt positions, then n_prompt, n_prompt+1...).
        if window:  # a sliding cache holds the tail only: where it starts follows from the step's position
            n_keys = plan.n_kept + st.decode_past + new - n_prompt
            if K > n_keys:
                raise RuntimeError(
                    f"layer {layer}: the KV cache holds {K} tokens, expected at most {n_keys} (this layer's "
                    f"{plan.n_kept} prompt tokens, then the generated ones); was the cache built by another prompt?")
        else:  # every key: the step's position follows from the cache's length, not from a Python int (which
            n_keys = K  # torch.compile would specialise on, recompiling at every step)
        total = n_prompt + n_keys - plan.n_kept  # keys an unpruned cache holds after this step
        dropped = n_keys - K  # a sliding cache's oldest entries
        hidden = None  # (new, K) keys a query does not see; one new token without a window sees them all
        if window or new > 1:
            generated = torch.arange(n_prompt, max(total, n_prompt), device=q.device)
            key_pos = torch.cat([plan.kept, generated])[:n_keys][dropped:]
            q_pos = st.decode_positions
            hidden = key_pos[None, :] > q_pos[:, None]
            if window:
                hidden |= (q_pos[:, None] - key_pos[None, :]) >= window
        if plan.mode is None:
            if self._original_impl == "eager":
                own_mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill(
                    hidden, torch.finfo(q.dtype).min)[None, None]
            else:
                own_mask = ~hidden[None, None]
            return original(module, q, k, v, own_mask, **kwargs)
        eager = self._original_impl == "eager"  # eager attention returns its probabilities (output_attentions)
        out = shallow_decode_attention(
            q, k, v, scale, plan.visual_columns(n_keys)[dropped:], plan.mode,
            None if plan.onehot is None else plan.onehot[dropped:n_keys], plan.firsts, hidden, weights=eager)
        out, weights = out if eager else (out, None)
        return out.transpose(1, 2).contiguous(), None if weights is None else weights.to(q.dtype)

    # ------------------------------------------------------------------------------ batches
    def _start_batch(self, input_ids, kwargs) -> "_Batch":
        """Per-row prompt states for a left-padded batch (rows without visual tokens pass through)."""
        adapter = self.adapter
        B, N = input_ids.shape
        lengths = self._row_lengths(input_ids, kwargs.get("attention_mask"))
        rows, first = [], True
        shared = {id(m): m for m in self.model.modules()}  # a row's copy of the method shares the model's modules
        for r, n in enumerate(lengths):
            ids = input_ids[r, N - n:]
            is_vis = adapter.visual_mask(ids)
            if not bool(is_vis.any()):
                rows.append(None)
                continue
            method = self.method if first else copy.deepcopy(self.method, dict(shared))
            first = False
            rows.append(self._prompt_state(ids, is_vis, adapter.row_call_kwargs(kwargs, input_ids, r, N - n), method))
        return _Batch(rows, lengths, N, self._num_layers)

    def _prompt_state(self, ids, is_vis, call_kwargs, method, extra: int = 0) -> _PromptState:
        """One prompt's layout (``ids`` unpadded, ``is_vis`` its visual-token mask, its spans from the
        adapter and its call arguments) and state, with ``method`` started on it."""
        spans = self.adapter.spans(ids, call_kwargs)
        layout = PromptLayout(length=int(ids.shape[0]), visual_positions=is_vis.nonzero().squeeze(-1),
                              image_spans=[(sp.start, sp.end) for sp in spans], span_kinds=[sp.kind for sp in spans])
        method.start(layout, self._num_layers)
        return _PromptState(layout, self._num_layers, ids.device, method, extra=extra)

    def _row_lengths(self, input_ids, mask) -> list[int]:
        """Each row's unpadded length in a left-padded batch (a clear error for right padding)."""
        N = input_ids.shape[1]
        valid = (torch.ones_like(input_ids, dtype=torch.bool) if not isinstance(mask, torch.Tensor) or mask.dim() != 2
                 else mask.bool())
        lengths = []
        for r in range(input_ids.shape[0]):
            n = int(valid[r].sum())
            if n == 0 or not bool(valid[r, N - n:].all()):
                raise ValueError("pruning a padded batch needs left padding (tokenizer.padding_side = 'left'): "
                                 f"row {r}'s attention_mask has zeros after its first token")
            lengths.append(n)
        return lengths

    @staticmethod
    def _reduced_decode_call(kwargs: dict, reduced_mask, caller_prompt: int, generated: int, new: int) -> dict:
        """A decode step after a prompt reduced before the language model: the caller's attention_mask
        (and the positions it implies) count the prompt as passed; the cache holds the reduced one,
        laid out by ``reduced_mask``."""
        B, device = reduced_mask.shape[0], reduced_mask.device
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if mask.shape[1] != caller_prompt + generated + new:
                raise ValueError(f"decode step's attention_mask has {mask.shape[1]} columns; expected "
                                 f"{caller_prompt + generated + new} (the prompt as passed, then the generated tokens)")
            tail = mask[:, caller_prompt:].to(reduced_mask.dtype)
        elif B == 1:  # a single prompt and no mask: nothing is padded, and a mask of ones would cost a read
            tail = None
        else:
            tail = torch.ones(B, generated + new, dtype=reduced_mask.dtype, device=device)
        if tail is not None:
            kwargs = dict(kwargs, attention_mask=torch.cat([reduced_mask, tail], 1))
        else:
            kwargs = dict(kwargs)
        if kwargs.get("position_ids") is None:  # the model would count the reduced cache
            kwargs["position_ids"] = (caller_prompt + generated + torch.arange(new, device=device))[None].expand(B, new)
        return kwargs

    @_eager
    def _batch_layer_inputs(self, idx: int, bt: "_Batch", args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        B, W, d = hidden.shape
        modified, kept = False, {}
        for r, st in enumerate(bt.rows):
            if st is None:
                continue
            off = W - bt.lengths[r]
            if idx == 0:
                self._select_at_input(st, hidden[r, off:])
            if st.pending_merges:
                if not modified:
                    hidden, modified = hidden.clone(), True
                hidden[r, off:] = self._merge(hidden[r : r + 1, off:], st)[0]
            if st.pending_keep is not None:
                keep = kept_rows(st)
                local = keep.nonzero().squeeze(-1)
                st.keep_rows(local)
                st.pending_keep = None
                if local.numel() != bt.lengths[r]:
                    kept[r] = local
        if kept:  # repack: every row right-aligned in the longest row's width
            lengths = [int(kept[r].numel()) if r in kept else bt.lengths[r] for r in range(B)]
            width = max(lengths)
            index = torch.empty(B, width, dtype=torch.long, device=hidden.device)
            for r in range(B):
                local = kept.get(r, torch.arange(bt.lengths[r], device=hidden.device)) + (W - bt.lengths[r])
                index[r] = torch.cat([local[:1].expand(width - local.numel()), local])  # pad slots: any own token
            hidden = hidden.gather(1, index[..., None].expand(B, width, d))
            bt.lengths, bt.width, bt.changed, modified = lengths, width, True, True
        bt.layer_widths[idx], bt.layer_lengths[idx], bt.layer_changed[idx] = bt.width, list(bt.lengths), bt.changed
        for r, st in enumerate(bt.rows):
            if st is not None:
                st.layer_positions[idx], st.layer_visual_ids[idx] = st.positions, st.visual_ids
                st.layer_visual_counts[idx] = st.present.numel()
                st.layer_input = hidden[r : r + 1, bt.width - bt.lengths[r]:]
        if not bt.changed:
            return ((hidden,) + tuple(args[1:]), kwargs) if modified and args else (
                (args, dict(kwargs, hidden_states=hidden)) if modified else None)
        # what the model hands every layer (rotary tables, positions, mask) follows the repacked rows
        orig = bt.slots(idx, hidden.device, caller=True)
        valid = orig >= 0
        first = torch.tensor([bt.width - n for n in bt.lengths], device=hidden.device)[:, None]
        orig = torch.where(valid, orig, orig.gather(1, first))  # padding slots: the row's first token
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = tuple(_gather_tokens(t, orig) for t in (cos, sin))
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            kwargs["position_ids"] = _gather_tokens(kwargs["position_ids"], orig, dim=-1)
        kwargs["attention_mask"] = self._batch_mask(kwargs.get("attention_mask"), orig, valid, hidden.dtype)
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _batch_mask(self, mask, orig, valid, dtype):
        """The model's own (B, 1, N, N) mask, rows and columns taken at each row's tokens; padding
        columns closed (a padding row keeps its own token's row, so it never sees nothing)."""
        B, W = orig.shape
        if isinstance(mask, torch.Tensor):
            m = mask.expand(B, mask.shape[1], mask.shape[2], mask.shape[3])
            m = m.gather(2, orig[:, None, :, None].expand(B, m.shape[1], W, m.shape[3]))
            m = m.gather(3, orig[:, None, None, :].expand(B, m.shape[1], W, W))
            see = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        else:  # plain causal in the caller's positions
            see = (orig[:, None, :] <= orig[:, :, None])[:, None]
        see = see & valid[:, None, None, :]
        if self._original_impl == "eager":
            return torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill(~see, torch.finfo(dtype).min)
        return see

    @_eager
    def _batch_attention(self, module, q, k, v, mask, original, scale, layer, bt, **kwargs):
        """Prefill: one attention call for the batch, then each row's shallow-stage rows and decision
        computed on that row's own tokens, exactly as alone. Rows in a shallow-stage layer are computed
        only by their own kernels (the plain call runs on the other rows alone)."""
        B, W = q.shape[0], q.shape[2]
        plain = [r for r, st in enumerate(bt.rows) if st is None or st.method.shallow_mode(layer) is None]
        if len(plain) == B:
            out = original(module, q, k, v, mask, **kwargs)
        else:
            out = (q.new_zeros(B, W, q.shape[1], v.shape[-1]), None)  # padding slots stay finite (zero)
            if plain:
                idx = torch.tensor(plain, device=q.device)
                m = mask.index_select(0, idx) if isinstance(mask, torch.Tensor) and mask.shape[0] == B else mask
                plain_out, plain_weights = original(module, q[idx], k[idx], v[idx], m, **kwargs)
                out[0][idx] = plain_out
                if plain_weights is not None:  # eager: the plain rows' probabilities too
                    out = (out[0], q.new_zeros(B, q.shape[1], W, W))
                    out[1][idx] = plain_weights
        for r, st in enumerate(bt.rows):
            if st is None:
                continue
            mode = st.method.shallow_mode(layer)
            st.layer_modes[layer] = mode
            off = W - bt.lengths[r]
            qr, kr, vr = q[r : r + 1, :, off:], k[r : r + 1, :, off:], v[r : r + 1, :, off:]
            vis = _visibility(mask[r : r + 1], W, W) if isinstance(mask, torch.Tensor) else None
            vis = None if vis is None else vis[off:, off:]
            if vis is not None and off == 0 and not bt.changed and self._plain_causal(vis):
                vis = None  # an unpadded row of a causal model: the cheapest kernels apply
            if mode is not None:
                out[0][r, off:] = self._shallow_prefill(module, qr, kr, vr, scale, mode, st, vis)[0][0]
                if self._original_impl == "eager":  # this row's probabilities in its own slots (others: zero)
                    if out[1] is None:
                        out = (out[0], q.new_zeros(B, q.shape[1], W, W))
                    out[1][r, :, off:, off:] = self._shallow_weights(qr, kr, scale, mode, st, vis)[0].to(q.dtype)
            self._decide(module, qr, kr, vr, scale, mode, st, vis, layer)
        return out

    @staticmethod
    def _plain_causal(vis: torch.Tensor) -> bool:
        n = vis.shape[-1]
        return bool(torch.equal(vis, torch.ones(n, n, dtype=torch.bool, device=vis.device).tril()))

    def _batch_key_layout(self, bt: "_Batch", layer: int, device):
        """Per row, this layer's prompt cache entries: original positions (-1: padding), whether each is
        visual, and the span each visual one belongs to (-1: none); built once per layer."""
        if layer not in bt.key_layout:
            pos = bt.slots(layer, device, caller=False)
            span = torch.full_like(pos, -1)
            for r, st in enumerate(bt.rows):
                if st is not None:
                    for g, (a, b) in enumerate(st.layout.image_spans):
                        span[r][(pos[r] >= a) & (pos[r] < b)] = g
            bt.key_layout[layer] = (pos, span)
        return bt.key_layout[layer]

    def _batch_decode_attention(self, module, q, k, v, mask, original, scale, layer, bt, **kwargs):
        """Decode: each row's keys in this layer's cache (padding, its kept prompt tokens, generated
        tokens; a sliding cache only the tail) are masked by their original positions. Shallow-stage
        layers compute every row's text query at once: softmax over all visible keys, visual keys'
        probabilities zeroed, each span's mass onto its first token (or renormalised without them)."""
        B, K, new = q.shape[0], k.shape[2], q.shape[2]
        if ("mode", layer) not in bt.key_layout:
            modes = {st.method.shallow_mode(layer) for st in bt.rows if st is not None}
            if len(modes) > 1:
                raise RuntimeError("rows of one batch disagree on the shallow stage; their configs must match")
            bt.key_layout[("mode", layer)] = modes.pop() if modes else None
        mode = bt.key_layout[("mode", layer)]
        if not bt.layer_changed[layer] and mode is None and (mask is None or mask.shape[-1] == K):
            return original(module, q, k, v, mask, **kwargs)  # this layer's cache is the caller's layout
        Wl, dev = bt.layer_widths[layer], q.device
        prompt_pos, prompt_span = self._batch_key_layout(bt, layer, dev)
        window = kwargs.get("sliding_window")
        # generated tokens before this step: from the cache's length where it holds them all (no Python int
        # for torch.compile to specialise on at every step); a sliding cache holds the tail only
        t = bt.generated if window else K - Wl - new
        if mode is None and new == 1 and not window and K == Wl + t + new:
            # one new token sees every cache entry of its row but the padding: the prompt part's padding
            # is fixed per layer, the generated part all visible
            if ("open", layer) not in bt.key_layout:
                valid = prompt_pos >= 0
                bt.key_layout[("open", layer)] = (valid, bool(valid.all()))
            valid, everything = bt.key_layout[("open", layer)]
            if everything:
                return original(module, q, k, v, None, **kwargs)
            see = torch.cat([valid, valid.new_ones(B, t + new)], 1)[:, None, None, :]
            if self._original_impl == "eager":
                see = torch.zeros(see.shape, dtype=q.dtype, device=dev).masked_fill(~see, torch.finfo(q.dtype).min)
            return original(module, q, k, v, see, **kwargs)
        if "lengths" not in bt.key_layout:  # copied to the device once, not at every step
            bt.key_layout["lengths"] = torch.tensor(bt.prompt_lengths, device=dev)[:, None]
        n = bt.key_layout["lengths"]
        steps = torch.arange(t + new, device=dev)[None, :]
        full = Wl + t + new
        key_pos = torch.cat([prompt_pos, n + steps], 1)[:, full - K:]
        key_span = torch.cat([prompt_span, torch.full((B, t + new), -1, dtype=torch.long, device=dev)], 1)[:, full - K:]
        q_pos = n + t + torch.arange(new, device=dev)[None, :]
        see = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= q_pos[:, :, None])
        if window:
            see &= (q_pos[:, :, None] - key_pos[:, None, :]) < window
        if mode is None:
            if new == 1 and bool(see.all()):
                own = None  # every row sees its whole cache: the plain kernel
            elif self._original_impl == "eager":
                own = torch.zeros(see[:, None].shape, dtype=q.dtype, device=dev).masked_fill(
                    ~see[:, None], torch.finfo(q.dtype).min)
            else:
                own = see[:, None]
            return original(module, q, k, v, own, **kwargs)
        # query heads grouped by their KV head (no K/V copies for GQA): rows ordered (group, query)
        H, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
        g = H // hkv
        qg = q.reshape(B, hkv, g * new, d).float()
        scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # (B, Hkv, g*new, K)
        visual = (key_span >= 0)[:, None, None, :]
        hidden = ~see.repeat(1, g, 1)[:, None]
        if mode == "disable_renorm":
            hidden = hidden | visual
        p = torch.softmax(scores.masked_fill(hidden, NEG_INF), dim=-1)
        out = torch.matmul(p.masked_fill(visual, 0.0), v.float())
        if mode == "merge":  # each span's visual mass onto its own first token's value
            G = max(len(st.layout.image_spans) for st in bt.rows if st is not None)
            mass = torch.zeros(*p.shape[:3], G + 1, dtype=p.dtype, device=dev)
            idx = key_span.add(1)[:, None, None, :].expand_as(p)  # span g -> column g + 1, text -> 0
            mass.scatter_add_(-1, idx, p)
            if "firsts" not in bt.key_layout:  # layer 0's values of each span's first token, per row
                firsts = torch.zeros(B, hkv, G, v.shape[-1], dtype=torch.float32, device=dev)
                for r, st in enumerate(bt.rows):
                    if st is not None and st.merge_values is not None:
                        for j, val in enumerate(st.merge_values):
                            firsts[r, :, j] = val[0, :, 0].float()
                bt.key_layout["firsts"] = firsts
            firsts = bt.key_layout["firsts"]
            out = out + torch.matmul(mass[..., 1:], firsts)
        weights = None
        if self._original_impl == "eager":  # output_attentions: the probabilities each row's queries used
            weights = p.masked_fill(visual, 0.0)
            if mode == "merge":  # each span's mass on its first key (layer 0's cache holds every token)
                span_of = key_span[:, None, :] == torch.arange(G, device=dev)[None, :, None]  # (B, G, K)
                first_key = span_of.float().argmax(-1)[:, None, None, :].expand(*p.shape[:3], G)
                weights = weights.scatter_add(-1, first_key, mass[..., 1:])
            weights = weights.to(q.dtype).reshape(B, H, new, K)
        return out.to(q.dtype).reshape(B, H, new, -1).transpose(1, 2).contiguous(), weights

    def _padding_flops(self, bt: "_Batch", r: int) -> int:
        """Prefill work the batch's padding costs row r: every layer ran it at the batch's width."""
        total = 0
        for layer in range(self._num_layers):
            w, n = bt.layer_widths[layer], bt.layer_lengths[layer][r]
            total += (F_.layer_flops(self.dims, w, F_.causal_pairs(w), F_.causal_pairs(w))
                      - F_.layer_flops(self.dims, n, F_.causal_pairs(n), F_.causal_pairs(n)))
        return total

    # ------------------------------------------------------------------------------- FLOPs
    def _prefill_stats(self, st: _PromptState) -> PruneStats:
        return prefill_stats(st, self.dims, self.vision_dims, self._num_layers)

    def _decode_flops(self, st: _PromptState) -> tuple[int, int]:
        dims = self.dims
        new = int(st.decode_positions.numel())
        total = st.decode_past + new  # keys in an unpruned cache after this step
        generated = total - st.layout.length
        pruned = dense = 0
        if st.layer_counts is None:  # fixed once the prompt is prefilled
            st.layer_counts = [(int(st.layer_positions[layer].numel()), st.layer_visual_counts[layer],
                                st.method.shallow_mode(layer)) for layer in range(self._num_layers)]
        for layer, (kept, n_vis, mode) in enumerate(st.layer_counts):
            kept += generated
            # causal within the step's new tokens: query i sees keys up to kept - new + i + 1
            causal = new * kept - new * (new - 1) // 2
            if mode is None:
                score = weighted = causal
            else:
                score, weighted = F_.shallow_decode_pairs(kept, n_vis, len(st.layout.image_spans), mode)
                score, weighted = score * new, weighted * new
            pruned += F_.layer_flops(dims, new, score, weighted)
            dense_total = total + st.dense_offset
            dense_causal = new * dense_total - new * (new - 1) // 2
            dense += F_.layer_flops(dims, new, dense_causal, dense_causal)
        return pruned, dense


def apply(model: nn.Module, config=None, *, schedule=None) -> PruningHandle:
    """Apply a pruning method to ``model`` in place; returns a handle (``remove()`` / ``with``).

    ``config`` is a method config (default: ``VisiPrunerConfig()``); ``schedule`` forces
    VisiPruner's fusion/critical/exit decisions instead of measuring them.
    """
    from .config import MethodConfig, VisiPrunerConfig

    if config is None:
        config = VisiPrunerConfig()
    if handle_of(model) is not None:
        raise RuntimeError("this model already has a visipruner method applied; call handle.remove() first")
    adapter = get_adapter(model)
    if isinstance(config, VisiPrunerConfig):
        method = config.build(schedule=schedule)
    elif schedule is not None:
        raise ValueError("schedule= only applies to VisiPruner configs")
    elif isinstance(config, MethodConfig):
        method = config.build()
    elif isinstance(config, PruningMethod):
        method = config
    else:
        raise TypeError(f"apply() takes a method config or a PruningMethod, got {type(config).__name__}")
    if hasattr(method, "reduce_prompt") and not adapter.supports_pre_lm_methods:
        raise ValueError(
            f"{method.name} acts before the language model (on the vision features), which is implemented for "
            f"LLaVA only; it does not support {adapter.family} ({type(model).__name__})"
        )
    return PruningHandle(model, method, adapter)
