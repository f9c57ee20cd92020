"""LLaVA-NeXT and LLaVA-OneVision (any-resolution tiles, OneVision video).

An image is one run of image tokens: the base tile, then the unpadded grid of the other tiles with
a newline token closing each row (OneVision: a prompt of several images holds base tiles only, each
followed by one newline token). All of those are image tokens, so each run is one image span.

A OneVision video is one run of video tokens: each frame's features pooled to a
ceil(p/2) x ceil(p/2) grid (p: patches per side of a tile), frame after frame, and one newline token
after the last frame. Each frame is a span; the trailing newline token belongs to the last frame's
span (it is not a frame of its own, and a span of one token would make it a merge target of its own).
"""

from __future__ import annotations

import math

import torch

from . import register
from .base import ModelAdapter, Span, frame_spans, runs
from .llava import check_text_model


class LlavaNextAdapter(ModelAdapter):
    family = "LLaVA-NeXT"

    @property
    def frame_tokens(self) -> int:
        """Tokens of one pooled video frame (OneVision's ``apply_pooling``: ceil(p/2)^2)."""
        v = self.model.config.vision_config
        return math.ceil((v.image_size // v.patch_size) / 2) ** 2

    def spans(self, input_ids: torch.Tensor, call_kwargs: dict) -> list[Span]:
        ids = input_ids.tolist()
        out = [Span(s, e, "image") for s, e in runs([t == self.visual_token_ids["image"] for t in ids])]
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
