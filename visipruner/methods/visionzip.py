"""VisionZip (Yang et al. 2024): fewer visual tokens before the language model.

At the vision layer LLaVA takes its features from, keep the *dominant* patches (largest
attention from the CLS token, mean over heads) and merge the remaining patches into a few
*contextual* tokens: evenly spaced targets among the rest, every other patch averaged into the
target whose key it is most similar to (cosine). The language model then sees
``dominant + contextual`` tokens per image instead of all patches: the prompt itself is shorter.
The kept image slots (the first ``dominant + contextual`` of each image's run) and the text keep
their original positions, with gaps where patches were dropped, as in-LLM pruning keeps them and
as ``generate`` counts them; VisionZip's own code renumbers the shortened prompt contiguously
instead, which shifts every later text token's position.

Defaults are VisionZip's 192-of-576 setting (162 dominant + 30 contextual) as fractions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import MethodConfig, check_float
from .base import PruningMethod


@dataclass
class VisionZipConfig(MethodConfig):
    dominant_ratio: float = field(default=162 / 576, metadata={"help": "Fraction of patches kept by CLS attention."})
    contextual_ratio: float = field(default=30 / 576, metadata={"help": "Fraction of patches as merged contextual tokens."})
    method = "visionzip"

    def __post_init__(self):
        check_float("dominant_ratio", self.dominant_ratio, 0.0, 1.0)
        check_float("contextual_ratio", self.contextual_ratio, 0.0, 1.0)
        if self.dominant_ratio + self.contextual_ratio > 1.0:
            raise ValueError("dominant_ratio + contextual_ratio must be <= 1")

    def build(self):
        return VisionZip(self)


def _feature_layer(vision_tower, feature_layer: int):
    """The encoder layer whose output LLaVA takes as image features."""
    layers = getattr(vision_tower, "vision_model", vision_tower).encoder.layers
    i = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer  # index into hidden_states
    if not 1 <= i <= len(layers):
        raise ValueError(f"VisionZip: vision_feature_layer {feature_layer} is not an encoder layer's output")
    return layers[i - 1]


def cls_attention_and_keys(layer, layer_input: torch.Tensor):
    """CLS row of ``layer``'s attention (mean over heads, over patches) and the patches' keys."""
    attn = layer.self_attn
    x = layer.layer_norm1(layer_input)
    b, n, d = x.shape
    h = attn.num_heads
    q = attn.q_proj(x[:, :1]).view(b, 1, h, -1).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, h, -1).transpose(1, 2)
    a = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)[:, :, 0]  # (b, h, n)
    keys = k.transpose(1, 2).reshape(b, n, d)
    return a.mean(1)[:, 1:], keys[:, 1:]


def zip_patches(features: torch.Tensor, cls_attn: torch.Tensor, keys: torch.Tensor, n_dom: int, n_ctx: int):
    """One image: (n, d) patch features -> (n_dom + n_ctx, d)."""
    n = features.shape[0]
    dom = cls_attn.argsort(descending=True, stable=True)[:n_dom].sort().values
    rest_mask = torch.ones(n, dtype=torch.bool, device=features.device)
    rest_mask[dom] = False
    rest = rest_mask.nonzero().squeeze(-1)
    parts = [features[dom]]
    if n_ctx > 0 and rest.numel() > 0:
        n_ctx = min(n_ctx, rest.numel())
        step = rest.numel() / n_ctx
        t_local = torch.tensor([int(i * step) for i in range(n_ctx)], device=features.device)
        targets = rest[t_local]
        others_mask = torch.ones(rest.numel(), dtype=torch.bool, device=features.device)
        others_mask[t_local] = False
        others = rest[others_mask]
        sim = F.normalize(keys[others], dim=-1) @ F.normalize(keys[targets], dim=-1).T
        assign = sim.argmax(dim=-1)
        sums = features[targets].clone()
        counts = torch.ones(n_ctx, device=features.device, dtype=features.dtype)
        sums.index_add_(0, assign, features[others])
        counts.index_add_(0, assign, torch.ones_like(assign, dtype=features.dtype))
        parts.append(sums / counts[:, None])
    return torch.cat(parts, dim=0)


class VisionZip(PruningMethod):
    """Acts before the language model, through ``reduce_prompt``; nothing inside it.

    Generation computes image features before the model's forward, so the feature layer's input
    and output are captured by a hook on that vision layer whenever the vision tower runs.
    Kept image slots and the text keep their original positions (as with in-LLM pruning, and as
    ``generate`` counts them); VisionZip's own code renumbers the shortened prompt instead.
    """

    name = "visionzip"

    def __init__(self, config: VisionZipConfig):
        self.config = config
        self._captured = None

    def sizes(self, n_patches: int) -> tuple[int, int]:
        dom = max(1, math.ceil(self.config.dominant_ratio * n_patches))
        ctx = min(n_patches - dom, math.ceil(self.config.contextual_ratio * n_patches))
        return dom, max(0, ctx)

    def attach(self, adapter) -> list:
        cfg = adapter.multimodal.config
        if not isinstance(cfg.vision_feature_layer, int) or cfg.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError("VisionZip supports one vision_feature_layer and the 'default'/'full' strategies")
        if getattr(adapter.multimodal.multi_modal_projector, "pools_patches", False):
            raise ValueError("VisionZip keeps a subset of the vision encoder's patches, which needs a per-patch "
                             "projector; this model's projector pools the patch grid (MobileVLM's LDP)")
        layer = _feature_layer(adapter.multimodal.vision_tower, cfg.vision_feature_layer)

        self._layer = layer
        return [layer.register_forward_hook(self._capture, with_kwargs=True)]  # bound: a deepcopy hooks its copy

    def _capture(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        self._captured = (x, output[0] if isinstance(output, tuple) else output)

    @torch.no_grad()
    def reduce_prompt(self, multimodal, image_token_id: int, kwargs: dict) -> dict:
        """Rewrite the LlavaModel call: fewer image tokens in input_ids, zipped features passed in.

        A left-padded batch comes back left-padded to its longest reduced row, with the
        attention_mask that says so (always set: with none, gapped positions would be taken for
        packed sequences). Each image is scored, zipped and projected on its own, so a row's
        features are those it gets alone."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pixel_values = kwargs.get("pixel_values")
        if pixel_values is not None:
            self._captured = None
            multimodal.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        elif not (kwargs.get("mm_encoder_outputs") or {}).get("image"):
            raise ValueError("VisionZip needs pixel_values (it reduces the vision encoder's output)")
        if self._captured is None:
            raise RuntimeError("VisionZip: the vision feature layer did not run for this prompt")
        layer_in, layer_out = self._captured
        self._captured = None
        feats = layer_out[:, 1:]  # patches only (the CLS token is the one doing the scoring)
        n_dom, n_ctx = self.sizes(feats.shape[1])
        image_features = []
        for i in range(feats.shape[0]):
            cls_attn, keys = cls_attention_and_keys(self._layer, layer_in[i : i + 1])
            zipped = zip_patches(feats[i], cls_attn[0], keys[0], n_dom, n_ctx)
            image_features.append(multimodal.multi_modal_projector(zipped[None])[0])
        ids = kwargs["input_ids"]
        per_image = feats.shape[1] + (1 if multimodal.config.vision_feature_select_strategy == "full" else 0)
        is_img = ids == image_token_id
        per_row = is_img.sum(1)
        if int(per_row.sum()) != per_image * feats.shape[0] or bool((per_row % per_image).any()):
            raise ValueError(
                f"Image features and image tokens do not match: {per_row.tolist()} image tokens per row for "
                f"{feats.shape[0]} image(s) of {per_image} features"
            )
        # keep the first n_dom + n_ctx image tokens of each image's run (images in row-major order)
        run_pos = (torch.cumsum(is_img.flatten().long(), 0) - 1).view_as(ids)  # index among image tokens
        keep = ~is_img | ((run_pos % per_image) < (n_dom + n_ctx))
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            keep &= mask.bool()  # the caller's padding goes; the rows are padded again below
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device)[None]
        text = ids[~is_img]
        kwargs = dict(kwargs)
        kwargs.update(left_pad_kept(ids, positions.expand_as(ids), keep, int(text[0]) if text.numel() else 0))
        kwargs["pixel_values"] = None
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=image_features)}
        return kwargs


def left_pad_kept(ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, fill_id: int) -> dict:
    """input_ids, position_ids and attention_mask of each row's kept tokens (``keep``, (B, N) bool),
    right-aligned in the longest row's width; padding slots hold ``fill_id`` (a text token)."""
    lengths = keep.sum(1)
    width = int(lengths.max())
    index = torch.zeros(ids.shape[0], width, dtype=torch.long, device=ids.device)
    for r in range(ids.shape[0]):
        kept = keep[r].nonzero().squeeze(-1)
        index[r, width - kept.numel():] = kept
    pad = torch.arange(width, device=ids.device)[None] < (width - lengths)[:, None]
    return {"input_ids": ids.gather(1, index).masked_fill(pad, fill_id),
            "position_ids": positions.gather(1, index).masked_fill(pad, 0),
            "attention_mask": (~pad).long()}
