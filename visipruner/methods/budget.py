"""A token budget: how many visual tokens a method keeps, as a fraction or as a count.

Every budgeted config has ``keep_ratio`` (fraction of the prompt's visual tokens) and
``keep_tokens`` (a count over the prompt's visual tokens); at most one may be set, and with
neither the method's published default ratio applies.
"""

from __future__ import annotations

import math

from ..config import check_float, check_int


def check_budget(cfg) -> None:
    """One clear line when both budgets are given or either is out of range."""
    if cfg.keep_ratio is not None and cfg.keep_tokens is not None:
        raise ValueError(f"{type(cfg).__name__}: give keep_ratio or keep_tokens, not both "
                         f"(got keep_ratio={cfg.keep_ratio}, keep_tokens={cfg.keep_tokens})")
    if cfg.keep_ratio is not None:
        check_float("keep_ratio", cfg.keep_ratio, 0.0, 1.0, low_open=True)
    if cfg.keep_tokens is not None:
        check_int("keep_tokens", cfg.keep_tokens, 1, None)


def budget_tokens(cfg, num_visual: int, default_ratio: float) -> int:
    """Visual tokens to keep out of ``num_visual``: ``keep_tokens`` (at most all of them), else
    ``ceil(keep_ratio * num_visual)`` (the default ratio when neither is set)."""
    if cfg.keep_tokens is not None:
        return min(cfg.keep_tokens, num_visual)
    ratio = default_ratio if cfg.keep_ratio is None else cfg.keep_ratio
    return min(num_visual, math.ceil(ratio * num_visual))
