"""Qwen3-VL: interleaved M-RoPE, q/k norms, and deepstack.

Positions and frames are as in Qwen2-VL (the model's rotary module interleaves the three axes; the
runtime slices the cos/sin it hands every layer; a video's frames are separate runs, a timestamp
between them). Deepstack: the model adds features from several vision layers to the hidden states
of the visual tokens after each of its first language-model layers, one feature row per visual
token of the batch in reading order (``visual_pos_masks``). Once tokens are dropped (each batch row
its own, the rows then repacked to one width) the model's own addition no longer fits, so while a
prefill is pruned this adapter takes the deepstack inputs away from the language model and adds
them itself, after each of those layers, to the visual tokens that layer actually ran on, each
token its own feature row (found from its position in the caller's input). Without a pruned prefill
(pruning disabled, no visual tokens, decode steps) the model runs untouched.
"""

from __future__ import annotations

import functools

import torch

from . import register
from .qwen_vl import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    family = "Qwen3-VL"

    def install(self, handle) -> list:
        deepstack = _Deepstack(handle)  # hooks are its bound methods: a deepcopy of the model hooks its own copy
        hooks = [self.language_model.register_forward_pre_hook(deepstack.take, with_kwargs=True)]
        return hooks + [layer.register_forward_hook(functools.partial(deepstack.add, i))
                        for i, layer in enumerate(self.layers)]


class _Deepstack:
    """Qwen3-VL's deepstack features (added to the first layers' visual tokens) follow the pruned tokens:
    the language model's inputs are taken at its door and added after each layer to the tokens it kept."""

    def __init__(self, handle):
        self.handle = handle
        self.taken = {}  # the deepstack inputs of the prefill being pruned: prefill, feature rows, features

    def take(self, module, args, kwargs):
        prefill = self.handle.pruned_prefill()
        self.taken.clear()
        if prefill is None or kwargs.get("deepstack_visual_embeds") is None:
            return None
        mask = kwargs["visual_pos_masks"].bool()  # (batch, caller's length)
        # feature row of each token of the caller's input (-1: none), in the model's own order
        row = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
        row[mask] = torch.arange(int(mask.sum()), device=mask.device)
        self.taken.update(prefill=prefill, row=row, embeds=kwargs["deepstack_visual_embeds"])
        kwargs = dict(kwargs, visual_pos_masks=None, deepstack_visual_embeds=None)
        return args, kwargs

    def add(self, idx, module, args, output):
        taken, handle = self.taken, self.handle
        if not taken or taken["prefill"] is not handle.pruned_prefill() or idx >= len(taken["embeds"]):
            return None
        slots = handle.layer_slots(idx).to(output.device)  # this layer's tokens, as the runtime ran them
        row = taken["row"].to(output.device).gather(1, slots.clamp(min=0))
        row = row.masked_fill(slots < 0, -1)
        present = row >= 0
        if not bool(present.any()):
            return None
        feats = taken["embeds"][idx].to(output.device, output.dtype)
        output = output.clone()
        output[present] = output[present] + feats[row[present]]
        return output


@register("Qwen3VLForConditionalGeneration")
def _qwen3_vl(model) -> Qwen3VLAdapter:
    cfg = model.config
    return Qwen3VLAdapter(model, model.model, model.model.language_model,
                          {"image": cfg.image_token_id, "video": cfg.video_token_id})
