"""Plumbing for the CPU test environment only (scripts/setup.sh --vllm): lets torchvision import.

vLLM's LLaVA imports torchvision (through transformers' Pixtral image processor), and with
torchvision installed transformers imports it everywhere (lmms-eval's CLI too). On this CPU
machine the only torchvision 0.28.0 on PyPI is a CUDA build; its compiled ops cannot load on the
CPU torch 2.13.0, and importing it then fails in ``torchvision/_meta_registrations.py``, which
registers fake kernels for the ops ``torchvision::nms`` and ``torchvision::qnms``. Defining those
two op schemas first (with ``torch.library``; no kernels, nothing calls them) lets torchvision's
pure-Python parts import.

``scripts/setup.sh --vllm`` puts a ``.pth`` file in the test environment's site-packages that loads
this file (by path, without importing the ``visipruner`` package) and calls ``install_import_hook``
at interpreter start: the schemas are defined just before torchvision is first imported, in every
process (pytest, vLLM's engine and helper processes, lmms-eval). It acts only on a CPU torch with a
CUDA torchvision; a GPU user has a torchvision that matches their torch, and no ``.pth`` file.
Only the standard library is imported until torchvision is.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import re
import sys
from pathlib import Path

_LIBRARY = None  # kept alive: dropping a torch.library.Library removes its definitions


def _version_in(package: str, pattern: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    m = re.search(pattern, version_file.read_text()) if version_file.exists() else None
    return m.group(1) if m else None


def needed() -> bool:
    """A CPU-only torch with PyPI's CUDA torchvision (read from their version files, nothing imported)."""
    tv = _version_in("torchvision", r"__version__\s*=\s*'([^']+)'")
    cuda = _version_in("torch", r"\ncuda\s*(?::[^=]*)?=\s*(None|'[^']*')")
    return bool(tv and "+cu" in tv and cuda == "None")


def define_torchvision_op_schemas() -> bool:
    """Define the op schemas torchvision's fake registrations need, where ``needed()``, before torchvision
    is first imported. Returns whether it did."""
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules or not needed():
        return False
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = lib
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Defines the schemas when ``import torchvision`` starts, then lets the normal finders find it."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_torchvision_op_schemas()
        return None


def install_import_hook() -> None:
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path) and "torchvision" not in sys.modules:
        sys.meta_path.insert(0, _BeforeTorchvision())
