"""A token budget: how many visual tokens a method keeps, as a fraction or as a count.

A budgeted config has ``keep_ratio`` (a fraction of the visual tokens) and ``keep_tokens`` (a
count); at most one may be given, and with neither ``keep_ratio`` is the method's published
default.
"""

from __future__ import annotations

import math

from ..config import check_float, check_int


def check_budget(cfg, default_ratio: float | None = None, allow_none_kept: bool = False) -> None:
    """One clear line when both budgets are given or either is out of range; with neither given,
    ``keep_ratio`` becomes ``default_ratio`` (the method's published setting). ``allow_none_kept``:
    a budget of 0 is valid (methods inside the model, where it means every visual token leaves)."""
    if cfg.keep_ratio is not None and cfg.keep_tokens is not None:
        raise ValueError(f"{type(cfg).__name__}: give keep_ratio or keep_tokens, not both "
                         f"(got keep_ratio={cfg.keep_ratio}, keep_tokens={cfg.keep_tokens})")
    if cfg.keep_ratio is not None:
        check_float("keep_ratio", cfg.keep_ratio, 0.0, 1.0, low_open=not allow_none_kept)
    if cfg.keep_tokens is not None:
        check_int("keep_tokens", cfg.keep_tokens, 0 if allow_none_kept else 1, None)
    elif cfg.keep_ratio is None and default_ratio is not None:
        cfg.keep_ratio = default_ratio


def budget_tokens(cfg, num_visual: int) -> int:
    """Visual tokens to keep out of ``num_visual``: ``keep_tokens`` (at most all of them), else
    ``ceil(keep_ratio * num_visual)``."""
    if cfg.keep_tokens is not None:
        return min(cfg.keep_tokens, num_visual)
    return min(num_visual, math.ceil(cfg.keep_ratio * num_visual))
