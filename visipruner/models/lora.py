"""Minimal LoRA for nn.Linear, used only during training of the organism.

At load time the deltas are merged into the base weights (``merge_lora``) so
the shipped model is a plain Hugging Face Llava.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.r = r
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def weight(self):  # some HF code peeks at .weight (dtype/device)
        return self.base.weight

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def apply_lora(module: nn.Module, r: int, alpha: float, targets=DEFAULT_TARGETS) -> dict[str, LoRALinear]:
    """Wrap every nn.Linear whose attribute name is in ``targets``. Returns {path: LoRALinear}."""
    wrapped = {}
    for name, mod in list(module.named_modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                lora = LoRALinear(child, r, alpha)
                setattr(mod, child_name, lora)
                wrapped[f"{name}.{child_name}" if name else child_name] = lora
    return wrapped


def lora_state(wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    out = {}
    for path, m in wrapped.items():
        out[f"lora.{path}.A"] = m.lora_A.detach().clone()
        out[f"lora.{path}.B"] = m.lora_B.detach().clone()
    return out


def load_lora_state(wrapped: dict[str, LoRALinear], state: dict[str, torch.Tensor]) -> None:
    for path, m in wrapped.items():
        m.lora_A.data.copy_(state[f"lora.{path}.A"])
        m.lora_B.data.copy_(state[f"lora.{path}.B"])


def unwrap_lora(module: nn.Module) -> None:
    """Merge every LoRALinear inside ``module`` into its base Linear and unwrap it."""
    for name, mod in list(module.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    delta = (child.lora_B.float() @ child.lora_A.float()) * child.scale
                    child.base.weight.add_(delta.to(child.base.weight.dtype))
                setattr(mod, child_name, child.base)


@torch.no_grad()
def merge_lora(module: nn.Module, state: dict[str, torch.Tensor], scale: float) -> int:
    """Add ``scale * B @ A`` from ``state`` (keys ``lora.<path>.A/B``) into ``module``'s Linears."""
    n = 0
    for key, A in state.items():
        if not (key.startswith("lora.") and key.endswith(".A")):
            continue
        path = key[len("lora."):-len(".A")]
        B = state[f"lora.{path}.B"]
        lin = module.get_submodule(path)
        if isinstance(lin, LoRALinear):
            lin = lin.base
        lin.weight.add_(((B.float() @ A.float()) * scale).to(lin.weight.dtype))
        n += 1
    return n
