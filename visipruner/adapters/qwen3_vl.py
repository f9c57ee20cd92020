"""Qwen3-VL: interleaved M-RoPE, q/k norms, and deepstack.

Positions and frames are as in Qwen2-VL (the model's rotary module interleaves the three axes; the
runtime slices the cos/sin it hands every layer; a video's frames are separate runs, a timestamp
between them). Deepstack: the model adds features from several vision layers to the hidden states
of the visual tokens after each of its first language-model layers. Once tokens are dropped the
model's own addition no longer fits the shorter sequence, so while a prompt is pruned this adapter
takes the deepstack inputs away from the language model and adds them itself, after each of those
layers, to the visual tokens that layer actually ran on (by their original positions). Without an
active prompt (pruning disabled, no visual tokens, decode steps) the model runs untouched.
"""

from __future__ import annotations

import torch

from . import register
from .qwen_vl import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    family = "Qwen3-VL"
    supports_batches = False  # deepstack's additions are taken per prompt (see install)

    def install(self, handle) -> list:
        taken = {}  # the deepstack inputs of the prompt being prefilled: state, rows, features

        def take(module, args, kwargs):
            st = handle._state
            taken.clear()
            if st is None or st.prefilled or kwargs.get("deepstack_visual_embeds") is None:
                return None
            mask = kwargs["visual_pos_masks"]
            if mask.shape[0] != 1:
                raise ValueError("deepstack with batch size above 1 is not supported while pruning")
            # deepstack row of each original position (-1: none), in the model's own order
            row = torch.full((mask.shape[-1],), -1, dtype=torch.long, device=st.positions.device)
            where = mask[0].to(row.device).nonzero().squeeze(-1)
            row[where] = torch.arange(where.numel(), device=row.device)
            taken.update(state=st, row=row, embeds=kwargs["deepstack_visual_embeds"])
            kwargs = dict(kwargs, visual_pos_masks=None, deepstack_visual_embeds=None)
            return args, kwargs

        def add(idx):
            def hook(module, args, output):
                if not taken or taken["state"] is not handle._state or idx >= len(taken["embeds"]):
                    return None
                st = taken["state"]
                rows = taken["row"][st.layer_positions[idx]]  # this layer's rows, as the runtime left them
                present = (rows >= 0).nonzero().squeeze(-1)
                if not present.numel():
                    return None
                feats = taken["embeds"][idx].to(output.device, output.dtype)
                output = output.clone()
                output[0, present] = output[0, present] + feats[rows[present]]
                return output

            return hook

        hooks = [self.language_model.register_forward_pre_hook(take, with_kwargs=True)]
        return hooks + [layer.register_forward_hook(add(i)) for i, layer in enumerate(self.layers)]


@register("Qwen3VLForConditionalGeneration")
def _qwen3_vl(model) -> Qwen3VLAdapter:
    cfg = model.config
    return Qwen3VLAdapter(model, model.model, model.model.language_model,
                          {"image": cfg.image_token_id, "video": cfg.video_token_id})
