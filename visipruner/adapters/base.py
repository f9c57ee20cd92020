"""What the shared runtime needs to know about a model family, and nothing more.

An adapter says where the decoder layers are, which input ids are visual (image, video) and how
a prompt's visual tokens split into spans (one image, one tile, one video frame). A family whose
model does something to the visual tokens between layers (Qwen3-VL's deepstack) installs its own
hooks through ``install``; the runtime itself never asks which family it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..flops import visual_spans as runs  # [start, end) of each maximal run of True

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class Span:
    """One run of visual tokens: an image (or a tile of one) or a video frame, [start, end)."""

    start: int
    end: int
    kind: str  # "image" or "video"

    def __len__(self) -> int:
        return self.end - self.start


class ModelAdapter:
    """Per-family knowledge. Subclasses set ``family`` and override the hooks that differ."""

    family = "?"
    # whether methods that act before the language model (VisionZip) can run on this family
    supports_pre_lm_methods = False

    def __init__(self, model: nn.Module, multimodal: nn.Module, language_model: nn.Module,
                 visual_token_ids: dict[str, int]):
        self.model = model  # the user's model, e.g. LlavaForConditionalGeneration
        self.multimodal = multimodal  # module whose forward sees input_ids and the cache
        self.language_model = language_model  # the decoder stack (LlamaModel, Qwen2VLTextModel...)
        self.layers: nn.ModuleList = language_model.layers
        self.visual_token_ids = {k: int(v) for k, v in visual_token_ids.items() if v is not None}

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def image_token_id(self) -> int:
        return self.visual_token_ids["image"]

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the visual tokens (any kind) in ``input_ids``."""
        ids = torch.tensor(sorted(self.visual_token_ids.values()), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def spans(self, input_ids: torch.Tensor, call_kwargs: dict) -> list[Span]:
        """Spans of one prompt's (1-D ``input_ids``) visual tokens, in order; each maximal run of one
        kind by default. ``call_kwargs`` are the multimodal model's call arguments (grids, sizes)."""
        out = []
        ids = input_ids.tolist()
        for kind, tok in self.visual_token_ids.items():
            out += [Span(s, e, kind) for s, e in runs([t == tok for t in ids])]
        return sorted(out, key=lambda s: s.start)

    def vision_dims(self):
        """The vision encoder's shape for ``flops.vision_flops``; None where it is not modelled (then
        ``PruneStats.vision_flops`` stays 0)."""
        return None

    def row_call_kwargs(self, call_kwargs: dict, input_ids: torch.Tensor, row: int, pad: int) -> dict:
        """The call arguments ``spans`` needs for one row of a left-padded batch (``pad`` padding
        tokens in front of it). Default: none (spans come from the token ids alone)."""
        return {}

    def install(self, handle) -> list:
        """Extra hooks a family needs while a handle is applied; returns their removable handles."""
        return []

    def check(self) -> None:
        impl = self.text_config._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attention implementation {impl!r} is not supported; load the model with "
                f"attn_implementation='sdpa' (the fast path) or 'eager'"
            )


def row_items(tokens_per_row: list[int], item_tokens: list[int], row: int, what: str) -> slice:
    """Which of a batch's items (images, videos), listed in row order, belong to row ``row``: each row
    takes items until their ``item_tokens`` cover its ``tokens_per_row``. ``what`` names the list in
    the error raised when the items run out."""
    at = first = 0
    for r in range(row + 1):  # the items of the rows before, then this row's
        first, need = at, tokens_per_row[r]
        while need > 0:
            if at == len(item_tokens):
                raise ValueError(f"{what} has {len(item_tokens)} items; the batch's tokens need more")
            need -= item_tokens[at]
            at += 1
    return slice(first, at)


def frame_spans(run: tuple[int, int], frame_tokens: int, kind: str = "video") -> list[Span]:
    """Split a run of video tokens into frames of ``frame_tokens`` tokens each."""
    s, e = run
    if frame_tokens <= 0 or (e - s) % frame_tokens:
        raise ValueError(f"a video run of {e - s} tokens does not split into frames of {frame_tokens} tokens")
    return [Span(a, a + frame_tokens, kind) for a in range(s, e, frame_tokens)]
