"""Plumbing for the CPU test environment only (scripts/setup.sh --vllm): lets vLLM import torchvision.

vLLM's LLaVA imports torchvision (through transformers' Pixtral image processor). On this CPU
machine the only torchvision 0.28.0 on PyPI is a CUDA build; its compiled ops cannot load on the
CPU torch 2.13.0, and importing it then fails in ``torchvision/_meta_registrations.py``, which
registers fake kernels for the ops ``torchvision::nms`` and ``torchvision::qnms``. Defining those
two op schemas first (with ``torch.library``; no kernels, nothing calls them) lets torchvision's
pure-Python parts import. A GPU user has a torchvision that matches their torch: nothing happens.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

_LIBRARY = None  # kept alive: dropping a torch.library.Library removes its definitions


def _installed_torchvision_is_cuda_build() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    if not version_file.exists():
        return False
    m = re.search(r"__version__\s*=\s*'([^']+)'", version_file.read_text())
    return bool(m and "+cu" in m.group(1))


def define_torchvision_op_schemas() -> bool:
    """On a CPU torch with a CUDA torchvision, define the op schemas torchvision's fake registrations
    need, before torchvision is first imported. Returns whether it did."""
    global _LIBRARY
    if _LIBRARY is not None or torch.version.cuda is not None or not _installed_torchvision_is_cuda_build():
        return False
    import sys

    if "torchvision" in sys.modules:
        return False
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = lib
    return True
