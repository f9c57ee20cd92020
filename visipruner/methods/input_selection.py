"""Methods that choose visual tokens before the language model, on any family.

The choice reads only what every family hands its language model: the input embeddings of the
prompt (the projected visual tokens, and the text tokens' own embeddings). The runtime asks the
method once, at the input of layer 0, and removes the other visual tokens there, so no layer
sees them, exactly as if the prompt had been built without them; kept tokens keep their
original positions (M-RoPE included), which the runtime already does for in-model pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import MethodConfig
from .base import PromptLayout, PruningMethod
from .budget import check_budget

DEFAULT_RATIO = 128 / 576  # the field's middle budget on LLaVA-1.5


@dataclass
class InputSelectionConfig(MethodConfig):
    """The budget of a method choosing before the language model (CDPruner, DivPrune)."""

    keep_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of the prompt's visual tokens kept (default 128/576), in (0, 1]."})
    keep_tokens: int | None = field(
        default=None, metadata={"help": "Number of the prompt's visual tokens kept (instead of keep_ratio), >= 1."})

    def __post_init__(self):
        check_budget(self, DEFAULT_RATIO)


class InputSelection(PruningMethod):
    """Base: ``select(visual, instruction)`` returns the visual ids (rows of ``visual``) to keep."""

    acts_at_input = True  # the runtime calls ``select_at_input`` at layer 0's input

    def __init__(self, config):
        self.config = config
        self.kept: list[int] = []

    def start(self, layout: PromptLayout, num_layers: int) -> None:
        self.kept = []

    def select(self, visual: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select_at_input(self, visual: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        """``visual`` (m, d): the prompt's visual tokens as layer 0 gets them; ``instruction`` (t, d):
        the text tokens after the first visual token. Returns the kept visual ids, sorted."""
        keep = self.select(visual.float(), instruction.float()).sort().values
        self.kept = keep.tolist()
        return keep

    def summary(self) -> dict:
        return {"kept_at_input": len(self.kept)}
