"""Families ``visipruner.apply`` prunes under transformers whose vLLM classes the plugin does not prune yet.

A folder of one of them can carry a ``visipruner_config`` (``visipruner calibrate``,
``recommended_config``); vLLM's own class would ignore it and serve the model unpruned while the
folder says pruned. The plugin registers, for each, a subclass of vLLM's own class that refuses such
a model at engine start in one line; without a config it is vLLM's class unchanged. The subclasses
are made on first use (``module:class`` registrations), so other models import nothing of them.
"""

from __future__ import annotations

import importlib

# architecture -> vLLM's module (vllm.model_executor.models.<module>) and class serving it
REFUSED = {
    "LlavaNextForConditionalGeneration": ("llava_next", "LlavaNextForConditionalGeneration"),
    "LlavaOnevisionForConditionalGeneration": ("llava_onevision", "LlavaOnevisionForConditionalGeneration"),
    "Idefics3ForConditionalGeneration": ("idefics3", "Idefics3ForConditionalGeneration"),
    "SmolVLMForConditionalGeneration": ("smolvlm", "SmolVLMForConditionalGeneration"),
    "Gemma3ForConditionalGeneration": ("gemma3_mm", "Gemma3ForConditionalGeneration"),
    # the same families in formats visipruner.apply does not take either
    "Qwen3VLMoeForConditionalGeneration": ("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"),
    "InternVLChatModel": ("internvl", "InternVLChatModel"),
}


def refuse_if_configured(arch: str, vllm_config) -> None:
    from .models import ARCHITECTURES
    from .settings import CONFIG_KEY

    if getattr(vllm_config.model_config.hf_config, CONFIG_KEY, None):
        raise ValueError(
            f"visipruner: the vLLM plugin does not prune {arch} yet (it prunes {', '.join(sorted(ARCHITECTURES))}); "
            f"serve this model with visipruner.apply under transformers, or remove {CONFIG_KEY} to serve it unpruned")


def _refusing(arch: str):
    module, name = REFUSED[arch]
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        refuse_if_configured(arch, vllm_config)
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)

    return type(arch, (base,), {"__init__": __init__, "__module__": __name__,
                                "__doc__": f"vLLM's {name}, refusing a visipruner_config (not pruned yet)."})


def __getattr__(arch: str):  # vLLM's lazy registration imports ``visipruner.vllm.refused:<arch>``
    if arch not in REFUSED:
        raise AttributeError(arch)
    cls = globals()[arch] = _refusing(arch)
    return cls
