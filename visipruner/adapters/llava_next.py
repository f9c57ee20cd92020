"""LLaVA-NeXT and LLaVA-OneVision (any-resolution tiles, OneVision video).

An image is a run of image tokens: the base tile, then the unpadded grid of the other tiles with a
newline token closing each row (OneVision: a prompt of several images holds base tiles only, each
followed by one newline token). All of those are image tokens of one image span. Images back to
back (no text between) are told apart by their token counts, worked out from ``image_sizes`` with
transformers' own grid and unpadding functions.

A OneVision video is one run of video tokens: each frame's features pooled to a
ceil(p/2) x ceil(p/2) grid (p: patches per side of a tile), frame after frame, and one newline token
after the last frame. Each frame is a span; the trailing newline token belongs to the last frame's
span (it is not a frame of its own, and a span of one token would make it a merge target of its own).
"""

from __future__ import annotations

import math

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from . import register
from .base import ModelAdapter, Span, frame_spans, row_items, runs
from .llava import check_text_model

class LlavaNextAdapter(ModelAdapter):
    family = "LLaVA-NeXT"

    @property
    def frame_tokens(self) -> int:
        """Tokens of one pooled video frame (OneVision's ``apply_pooling``: ceil(p/2)^2)."""
        v = self.model.config.vision_config
        return math.ceil((v.image_size // v.patch_size) / 2) ** 2

    def image_tokens(self, size, tiled: bool = True) -> int:
        """Tokens of an image of original ``size`` (h, w): the base tile, and (``tiled``) the unpadded
        grid of tiles with a newline token per row (OneVision: scaled down past ``anyres_max_N``);
        untiled, the base tile and one newline token. As the model's ``pack_image_features``."""
        cfg, v = self.model.config, self.model.config.vision_config
        p = v.image_size // v.patch_size
        if not tiled:
            return p * p + 1
        rows, cols = get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints, v.image_size)
        h, w = unpad_image(torch.empty(0, rows * p, cols * p), list(size)).shape[1:]
        aspect = getattr(cfg, "vision_aspect_ratio", None)
        if aspect is not None:  # OneVision
            ratio = math.sqrt(h * w / (int(aspect.strip("anyres_max_")) * p * p))
            if ratio > 1.1:
                h, w = int(h // ratio), int(w // ratio)
        return p * p + h * (w + 1)

    def image_spans(self, image_runs: list[tuple[int, int]], call_kwargs: dict) -> list[Span]:
        """Each image's span; a run holding several images is split by their token counts."""
        sizes = call_kwargs.get("image_sizes")
        if sizes is None:
            return [Span(s, e, "image") for s, e in image_runs]
        sizes = torch.as_tensor(sizes).tolist()
        per_prompt = call_kwargs.get("batch_num_images")
        tiled = per_prompt is None or int(torch.as_tensor(per_prompt).reshape(-1)[0]) == 1
        counts = [self.image_tokens(size, tiled) for size in sizes]
        out = []
        for s, e in image_runs:
            while s < e:
                if not counts or s + counts[0] > e:
                    raise ValueError(f"image_sizes {sizes} do not match the prompt's image tokens "
                                     f"({sum(b - a for a, b in image_runs)} tokens in {len(image_runs)} runs): pass the "
                                     "processor's image_sizes with its input_ids, no image token under padding")
                out.append(Span(s, s + counts[0], "image"))
                s += counts.pop(0)
        if counts:
            raise ValueError(f"image_sizes {sizes} describe more images than the prompt's image tokens hold")
        return out

    def row_call_kwargs(self, call_kwargs: dict, input_ids: torch.Tensor, row: int, pad: int) -> dict:
        """Row ``row``'s image sizes: the batch's images are in row order. OneVision's ``batch_num_images``
        holds one count per row with images (the processor leaves text-only rows out); without it each row
        takes as many images as its image tokens hold. The videos' frame count is the batch's."""
        out = {k: call_kwargs[k] for k in ("pixel_values_videos",) if call_kwargs.get(k) is not None}
        sizes = call_kwargs.get("image_sizes")
        if sizes is None:
            return out
        sizes = torch.as_tensor(sizes)
        with_images = (input_ids == self.visual_token_ids["image"]).sum(1).tolist()
        counts = call_kwargs.get("batch_num_images")
        if counts is not None:
            counts = torch.as_tensor(counts).reshape(-1).tolist()
            rows = [r for r, n in enumerate(with_images) if n]
            if len(rows) != len(counts):
                raise ValueError(f"batch_num_images {counts} does not give one count per row with images "
                                 f"({len(rows)} rows)")
            if row in rows:
                k = rows.index(row)
                start = sum(counts[:k])
                out.update(image_sizes=sizes[start : start + counts[k]], batch_num_images=torch.tensor([counts[k]]))
            return out
        mine = row_items(with_images, [self.image_tokens(s) for s in sizes.tolist()], row, "image_sizes")
        if mine.stop > mine.start:
            out["image_sizes"] = sizes[mine]
        return out

    def spans(self, input_ids: torch.Tensor, call_kwargs: dict) -> list[Span]:
        ids = input_ids.tolist()
        out = self.image_spans(runs([t == self.visual_token_ids["image"] for t in ids]), call_kwargs)
        if "video" in self.visual_token_ids:
            videos = call_kwargs.get("pixel_values_videos")
            frames = None if videos is None else int(videos.shape[1])
            for run in runs([t == self.visual_token_ids["video"] for t in ids]):
                out += video_frames(run, self.frame_tokens, frames)
        return sorted(out, key=lambda s: s.start)


def video_frames(run: tuple[int, int], per_frame: int, frames: int | None) -> list[Span]:
    """The frames of a run of OneVision video tokens (one or more videos of ``frames`` frames each,
    each video ``frames * per_frame`` tokens and a newline token); the newline joins the last frame."""
    s, e = run
    video = (e - s) if frames is None else frames * per_frame + 1  # tokens of one video
    if (e - s) % video or (video - 1) % per_frame or video == 1:
        raise ValueError(f"a run of {e - s} video tokens is not whole videos of frames of {per_frame} tokens "
                         f"and a newline token")
    out = []
    for a in range(s, e, video):
        frame_list = frame_spans((a, a + video - 1), per_frame)
        out += frame_list[:-1] + [Span(frame_list[-1].start, a + video, "video")]
    return out


@register("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
def _llava_next(model) -> ModelAdapter:
    cfg = model.config
    onevision = cfg.model_type == "llava_onevision"
    family = "LLaVA-OneVision" if onevision else "LLaVA-NeXT"
    check_text_model(family, cfg.text_config)
    ids = {"image": cfg.image_token_id}
    if onevision:
        ids["video"] = cfg.video_token_id
    a = LlavaNextAdapter(model, model.model, model.model.language_model, ids)
    a.family = family
    return a
