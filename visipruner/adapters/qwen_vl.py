"""Qwen2-VL and Qwen2.5-VL: M-RoPE positions, images and videos of any size.

The model computes 3-D (temporal, height, width) rotary positions for the whole prompt and hands
every layer the rotated cos/sin; the runtime slices those to the tokens still present, so kept
tokens keep their 3-D positions. In decode the model continues from ``rope_deltas`` and the
cache's layer 0 (never pruned), so nothing here needs to know about positions.
"""

from __future__ import annotations

import torch

from . import register
from .base import ModelAdapter, Span, frame_spans, row_items, runs


class QwenVLAdapter(ModelAdapter):
    family = "Qwen2-VL"

    def spans(self, input_ids: torch.Tensor, call_kwargs: dict) -> list[Span]:
        ids = input_ids.tolist()
        out = [Span(s, e, "image") for s, e in runs([t == self.visual_token_ids["image"] for t in ids])]
        video_runs = runs([t == self.visual_token_ids.get("video") for t in ids])
        if video_runs:
            grids, pos = call_kwargs.get("video_grid_thw"), call_kwargs.get("position_ids")
            if grids is not None:
                out += video_frames(video_runs, grids, self.merge)
            elif isinstance(pos, torch.Tensor) and pos.dim() == 3:
                # generate() hands the model precomputed vision features and 3-D positions instead of
                # the grids: a frame is a run of one temporal position
                out += frames_from_positions(video_runs, pos[-3, 0])
            else:
                raise ValueError("a prompt with video tokens needs video_grid_thw (or M-RoPE position_ids) "
                                 "to split the video into frames")
        return sorted(out, key=lambda s: s.start)

    def row_call_kwargs(self, call_kwargs: dict, input_ids: torch.Tensor, row: int, pad: int) -> dict:
        """Row ``row``'s video grids (the batch's grids are in row order; each row takes as many as its
        video tokens need) and its slice of M-RoPE positions."""
        out = {}
        pos = call_kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.dim() == 3:
            out["position_ids"] = pos[:, row : row + 1, pad:]
        grids = call_kwargs.get("video_grid_thw")
        if grids is not None:
            video = self.visual_token_ids.get("video")
            per_row = [int((input_ids[r] == video).sum()) for r in range(input_ids.shape[0])]
            sizes = [t * (h // self.merge) * (w // self.merge) for t, h, w in torch.as_tensor(grids).tolist()]
            mine = row_items(per_row, sizes, row, "video_grid_thw")
            if mine.stop > mine.start:
                out["video_grid_thw"] = torch.stack([torch.as_tensor(grids[i]) for i in range(mine.start, mine.stop)])
        return out

    @property
    def merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)


def video_frames(video_runs: list[tuple[int, int]], grids, merge: int) -> list[Span]:
    """Frames of each video: a video's tokens are one run (Qwen2-VL) or one run per frame
    (Qwen3-VL puts a timestamp between frames); ``grids`` are the videos' (t, h, w) patch grids."""
    if grids is None:
        raise ValueError("a prompt with video tokens needs video_grid_thw to split the video into frames")
    out, pending = [], list(video_runs)
    for t, h, w in torch.as_tensor(grids).tolist():
        per_frame, left = (h // merge) * (w // merge), t * (h // merge) * (w // merge)
        while left > 0:
            if not pending:
                raise ValueError("video_grid_thw describes more video tokens than the prompt holds")
            run = pending.pop(0)
            out += frame_spans(run, per_frame)
            left -= run[1] - run[0]
    if pending:
        raise ValueError("the prompt holds more video tokens than video_grid_thw describes")
    return out


def frames_from_positions(video_runs: list[tuple[int, int]], temporal: torch.Tensor) -> list[Span]:
    """Frames of each video run read off the temporal M-RoPE positions (one value per frame)."""
    out = []
    for s, e in video_runs:
        per_frame = int((temporal[s:e] == temporal[s]).sum())
        out += frame_spans((s, e), per_frame)
    return out


@register("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
def _qwen2_vl(model) -> ModelAdapter:
    cfg = model.config
    a = QwenVLAdapter(model, model.model, model.model.language_model,
                      {"image": cfg.image_token_id, "video": getattr(cfg, "video_token_id", None)})
    if type(model).__name__.startswith("Qwen2_5"):
        a.family = "Qwen2.5-VL"
    return a
