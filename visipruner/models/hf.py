"""Load a saved model folder of any supported family, with its own processor and chat template."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..inputs import InputError


def model_class_for(path: str | os.PathLike):
    """The transformers class a checkpoint folder loads as (its config's image-text-to-text class)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ..adapters import ADAPTERS, supported_models

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"{path}: not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    arch = (config.architectures or [None])[0]
    if arch in ADAPTERS:
        import transformers

        return getattr(transformers, arch), config
    try:
        cls = AutoModelForImageTextToText._model_mapping[type(config)]
    except KeyError:
        cls = None
    if cls is None or cls.__name__ not in ADAPTERS:
        raise InputError(
            f"{path}: model type {json.loads(cfg_file.read_text()).get('model_type')!r} "
            f"({arch or 'no architectures entry'}) is not supported; supported model classes: "
            f"{', '.join(supported_models())}"
        )
    return cls, config


def load_model_dir(path: str | os.PathLike, device="cpu", dtype=torch.float32, attn_implementation: str = "sdpa"):
    """``(model, processor)`` from a folder written by ``save_pretrained`` (model + processor) of any
    supported family; nothing is downloaded. The processor brings the family's chat template."""
    from transformers import AutoProcessor

    from .mobilevlm import is_mobilevlm_dir, load_mobilevlm

    if is_mobilevlm_dir(path):  # the MobileVLM code's own layout, not a transformers class
        # no transformers "auto" here: the loader's default (float32) stands for it
        return load_mobilevlm(path, dtype=None if dtype == "auto" else dtype, device=device,
                              attn_implementation=attn_implementation)
    cls, _ = model_class_for(path)
    model = cls.from_pretrained(str(path), dtype=dtype, attn_implementation=attn_implementation,
                                local_files_only=True)
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except (AttributeError, ImportError) as e:
        if "VIDEO_PROCESSOR" not in str(e) and "orchvision" not in str(e):
            raise
        # transformers 5.x builds these families' processors with a video processor, which needs torchvision
        raise InputError(
            f"{path}: the {cls.__name__} processor needs torchvision (for its video processor) in this transformers "
            "version; install the torchvision build that matches your torch. visipruner.apply works without it."
        ) from None
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
    return model.to(device).eval(), processor
