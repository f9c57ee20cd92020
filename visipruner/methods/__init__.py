"""Pruning methods: each a small object deciding what the shared runtime removes."""

from .base import PromptLayout, PruningMethod, Schedule
from .visipruner import VisiPruner

__all__ = ["PromptLayout", "PruningMethod", "Schedule", "VisiPruner"]
