"""The interface between a pruning method's decisions and the shared token-dropping runtime."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention import Influence


@dataclass
class PromptLayout:
    """Where the visual tokens of one (batch-1) prompt are. Each span is one image (or tile) or one
    video frame; the shallow stage merges a span's visual mass onto the span's first token."""

    length: int
    visual_positions: torch.Tensor  # long, sorted
    image_spans: list[tuple[int, int]]  # [start, end) of each visual span (image, tile or video frame)
    span_kinds: list[str] = field(default_factory=list)  # "image" or "video", one per span

    @property
    def num_visual(self) -> int:
        return int(self.visual_positions.numel())


@dataclass
class Schedule:
    """A pruning schedule fixed in advance (benchmarks, replay, the FLOPs test).

    ``critical_tokens`` are indices into the prompt's visual tokens (0..num_visual-1), kept
    from ``fusion_layer + 1`` on; every visual token goes from ``exit_layer + 1`` on.
    """

    fusion_layer: int | None = None
    critical_tokens: list[int] = field(default_factory=list)
    exit_layer: int | None = None

    def __post_init__(self) -> None:
        if self.fusion_layer is not None and self.fusion_layer < 0:
            raise ValueError(f"Schedule.fusion_layer must be >= 0, got {self.fusion_layer}")
        if self.exit_layer is not None and self.exit_layer < 0:
            raise ValueError(f"Schedule.exit_layer must be >= 0, got {self.exit_layer}")
        if self.fusion_layer is not None and self.exit_layer is not None and self.exit_layer <= self.fusion_layer:
            raise ValueError(
                f"Schedule.exit_layer ({self.exit_layer}) must come after fusion_layer ({self.fusion_layer})"
            )
        self.critical_tokens = sorted(int(i) for i in self.critical_tokens)


@dataclass
class Decision:
    """A decision that also merges tokens (token recycling): returned by ``decide`` instead of ids.

    ``keep`` are the visual ids that stay from the next layer on. Each ``(dest, sources)`` in
    ``merges`` replaces the hidden state of kept token ``dest`` by the mean of the hidden states of
    ``dest`` and ``sources`` (visual ids), as they enter the next layer; ``dest`` keeps its position.
    """

    keep: torch.Tensor
    merges: list[tuple[int, list[int]]] = field(default_factory=list)


class PruningMethod:
    """Decision logic of one method; the runtime asks it, layer by layer, what to do.

    Per prompt the runtime calls ``start``; then in prefill, for each layer in order,
    ``shallow_mode`` (how text queries attend to visual keys), ``needs_influence`` and
    ``decide`` (which visual tokens stay from the next layer on). ``shallow_mode`` is also asked
    in decode steps; nothing else is decided while decoding.
    """

    name = "base"

    @property
    def enabled(self) -> bool:
        return True

    def start(self, layout: PromptLayout, num_layers: int) -> None:
        pass

    def shallow_mode(self, layer: int) -> str | None:
        """None, 'merge', 'disable' or 'disable_renorm' (see ``attention.text_rows_attention``)."""
        return None

    def needs_influence(self, layer: int) -> bool:
        return False

    def needs_text_attention(self, layer: int) -> bool:
        """Whether ``influence.text_attention`` (every text query row after the first image) is needed."""
        return False

    def decide(self, layer: int, influence: Influence | None, present: torch.Tensor) -> torch.Tensor | Decision | None:
        """Visual ids (indices into the prompt's visual tokens) to keep from ``layer + 1`` on.

        ``present`` holds the visual ids in this layer's sequence. Return None to keep them all,
        or a ``Decision`` to also merge dropped tokens into kept ones.
        """
        return None

    def summary(self) -> dict:
        """Method-specific results for the stats (fusion_layer, exit_layer, critical_tokens...)."""
        return {}
