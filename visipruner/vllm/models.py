"""vLLM's own model classes, subclassed so their language model prunes per request.

A subclass changes nothing of vLLM's class but ``forward``: with a pruning config (``settings.py``)
and a step that holds a pruned request, the language model's layers run through ``StepPruner``;
otherwise vLLM's own forward runs. Multimodal processing, weight loading and sampling are vLLM's.
"""

from __future__ import annotations

from vllm.model_executor.models.llava import LlavaForConditionalGeneration

from .. import flops as F_
from .pruner import StepPruner
from .records import Recorder
from .settings import check_engine, read_settings


def _pruner(model, vllm_config, lm, visual_token_ids, text_config):
    settings = read_settings(vllm_config.model_config.hf_config)
    if settings is None or not settings.config.enabled:
        return None
    check_engine(settings, vllm_config)
    from .metrics import observe

    recorder = Recorder(settings.config.method, settings.record_path, observers=[observe])
    return StepPruner(settings, lm, visual_token_ids, vllm_config, F_.Dims.from_config(text_config),
                      on_prefill=recorder)


class PrunedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA-1.5 (Llama or Qwen2 language model) with per-request visual-token pruning."""

    requires_raw_input_tokens = True  # the image placeholders say which tokens are visual

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.visipruner = _pruner(self, vllm_config, self.language_model.model, [self.config.image_token_index],
                                  self.config.text_config)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self.visipruner is not None and intermediate_tensors is None:
            out = self.visipruner.forward(input_ids, positions, inputs_embeds)
            if out is not None:
                return out
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds, **kwargs)


ARCHITECTURES = {"LlavaForConditionalGeneration": PrunedLlavaForConditionalGeneration}
