"""The ``vllm.general_plugins`` entry point: registers the pruning model classes with vLLM.

vLLM runs general plugins in every process it starts (API server, engine core, workers). The
classes registered here replace vLLM's own classes for the same architectures: a checkpoint of one
of them loads the subclass, which serves unpruned (vLLM's own forward, untouched) unless the
model's HF config carries a ``visipruner_config`` (see ``settings.py``). The families the plugin does not
prune yet refuse such a config at engine start (``refused.py``).
"""

from __future__ import annotations


def register() -> None:
    from .cpu_env import define_torchvision_op_schemas

    define_torchvision_op_schemas()  # CPU test environment only; see cpu_env.py
    from vllm import ModelRegistry

    from .kv_memory import register as register_kv_spec
    from .models import ARCHITECTURES

    register_kv_spec()  # the text-only KV-cache spec of the layers after a vision-exit bound (kv_memory.py)

    for arch, cls in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, cls)
    from .refused import REFUSED

    for arch in REFUSED:  # vLLM's classes that refuse a visipruner_config (imported on first use)
        ModelRegistry.register_model(arch, f"visipruner.vllm.refused:{arch}")
