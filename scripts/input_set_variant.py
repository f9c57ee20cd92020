"""Experiment (issue 22): is VisiPruner's shortfall on the embedded model *when* it prunes or
*which* tokens it keeps?

VisiPruner in budget mode keeps, at its fusion layer, the ``k`` visual tokens with the largest
influence ``||c_j||`` on the last token. CDPruner and DivPrune keep ``k`` tokens chosen before
the language model (instruction-conditioned DPP, max-min diversity) and remove the rest at layer
0. This variant keeps VisiPruner's schedule (no removal before its fusion layer, fusion detected
by the layer threshold or at the fallback layer, the exit as configured) but, at fusion, keeps the
``k`` tokens CDPruner or DivPrune would have chosen from the same prompt's layer-0 input. Against
plain budget mode at the same budget and schedule, it isolates the selection rule; against the
peer itself at the same budget, it isolates the timing (all tokens until fusion, then the peer's).

Used by ``scripts/agreement.py`` (a config JSON with ``"method": "visipruner_input_set"`` and
``"selector": "cdpruner"`` or ``"divprune"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from visipruner.config import VisiPrunerConfig
from visipruner.methods.cdpruner import CDPruner, CDPrunerConfig
from visipruner.methods.divprune import DivPrune, DivPruneConfig
from visipruner.methods.visipruner import VisiPruner

SELECTORS = {"cdpruner": (CDPruner, CDPrunerConfig), "divprune": (DivPrune, DivPruneConfig)}


@dataclass
class InputSetVisiPrunerConfig(VisiPrunerConfig):
    """VisiPruner in budget mode whose critical set is a peer's choice at the input."""

    selector: str = field(default="cdpruner", metadata={"help": "cdpruner or divprune"})
    method = "visipruner_input_set"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.budgeted:
            raise ValueError("visipruner_input_set selects a budget: give keep_ratio or keep_tokens")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {list(SELECTORS)}; got {self.selector!r}")

    def build(self, schedule=None):
        return InputSetVisiPruner(self, schedule=schedule)


class InputSetVisiPruner(VisiPruner):
    name = "visipruner_input_set"
    acts_at_input = True  # sees the layer-0 input; removes nothing there

    def start(self, layout, num_layers: int) -> None:
        super().start(layout, num_layers)
        self.input_choice: torch.Tensor | None = None

    def select_at_input(self, visual: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        method, config = SELECTORS[self.config.selector]
        k = self.config.budget(visual.shape[0])
        self.input_choice = method(config(keep_tokens=k)).select(visual.float(), instruction.float()).sort().values
        return torch.arange(visual.shape[0], device=visual.device)  # keep every token until fusion

    def decide(self, layer, influence, present):
        keep = super().decide(layer, influence, present)
        if keep is not None and self.fusion_layer == layer and self.schedule is None and keep.numel():
            if influence.visual_ids.numel() != self.num_visual:
                raise RuntimeError("visipruner_input_set expects every visual token present at fusion")
            self.critical_tokens = self.input_choice.to(keep.device)
            self.remaining = int(self.critical_tokens.numel())
            return self.critical_tokens
        return keep
