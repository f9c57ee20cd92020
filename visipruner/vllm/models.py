"""vLLM's own model classes, subclassed so their language model prunes per request.

A subclass changes nothing of vLLM's class but ``forward``: with a pruning config (``settings.py``)
and a step that holds a pruned request, the language model's layers run through ``StepPruner``;
otherwise vLLM's own forward runs. Multimodal processing, weight loading and sampling are vLLM's.
"""

from __future__ import annotations

from vllm.model_executor.models.interns1 import InternS1ForConditionalGeneration
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

from .. import flops as F_
from .kv_memory import kv_tiers, use_bounded_specs
from .pruner import StepPruner
from .records import Recorder
from .settings import check_engine, read_settings


def _pruner(model, vllm_config, lm, visual_token_ids, text_config):
    settings = read_settings(vllm_config.model_config.hf_config)
    if settings is None or not settings.config.enabled:
        return None
    check_engine(settings, vllm_config)
    from vllm.distributed import get_tensor_model_parallel_rank

    from .metrics import observe

    first = get_tensor_model_parallel_rank() == 0  # records leave one process (every rank has them)
    recorder = Recorder(settings.config.method, settings.record_path, observers=[observe], emit=first)
    pruner = StepPruner(settings, lm, visual_token_ids, vllm_config, F_.Dims.from_config(text_config),
                        on_prefill=recorder)
    tiers = kv_tiers(settings, len(pruner.layers))
    if tiers:  # layers that hold text and at most a bound of visual tokens: KV blocks for those only
        use_bounded_specs(pruner.attn, tiers)
    return pruner


class _PerRequestPruning:
    """The ``forward`` every pruned class shares; ``visual_token_ids`` are the family's placeholders."""

    requires_raw_input_tokens = True  # the placeholders say which tokens are visual

    def _init_pruning(self, vllm_config, visual_token_ids, text_config) -> None:
        self.visipruner = _pruner(self, vllm_config, self.language_model.model, visual_token_ids, text_config)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self.visipruner is not None and intermediate_tensors is None:
            # positions: (tokens,) or M-RoPE's (3, tokens); kept tokens keep theirs, and decode continues
            # from vLLM's own mrope_position_delta (the unpruned prompt's)
            out = self.visipruner.forward(input_ids, positions, inputs_embeds)
            if out is not None:
                return out
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds, **kwargs)


class PrunedLlavaForConditionalGeneration(_PerRequestPruning, LlavaForConditionalGeneration):
    """LLaVA-1.5 (Llama or Qwen2 language model) with per-request visual-token pruning."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_pruning(vllm_config, [self.config.image_token_index], self.config.text_config)


class PrunedQwen2VLForConditionalGeneration(_PerRequestPruning, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with per-request visual-token pruning (images and video frames)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        c = self.config
        self._init_pruning(vllm_config, [c.image_token_id, c.video_token_id], c.text_config)


class PrunedQwen2_5_VLForConditionalGeneration(_PerRequestPruning, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with per-request visual-token pruning (images and video frames)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        c = self.config
        self._init_pruning(vllm_config, [c.image_token_id, c.video_token_id], c.text_config)


class PrunedInternVLForConditionalGeneration(_PerRequestPruning, InternS1ForConditionalGeneration):
    """InternVL 2.5 / 3 / 3.5 in the Hugging Face format (``InternVLForConditionalGeneration``, which vLLM
    serves with its ``InternS1ForConditionalGeneration``; Llama, Qwen2 or Qwen3 language model) with
    per-request visual-token pruning. vLLM's processor writes an image's tiles as one run of
    ``<IMG_CONTEXT>`` tokens, and each video frame as a run of the tokenizer's ``video_token``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        video = _video_token(vllm_config) if read_settings(self.config) is not None else []
        self._init_pruning(vllm_config, [self.config.image_token_id, *video], self.config.text_config)


def _video_token(vllm_config) -> list[int]:
    """InternVL's video placeholder id (the tokenizer's ``video_token``; the HF config has no id for it)."""
    from vllm.tokenizers import cached_tokenizer_from_config

    tok = cached_tokenizer_from_config(vllm_config.model_config)
    if tok is None:
        raise ValueError("visipruner: InternVL's video placeholder id comes from its tokenizer; start vLLM "
                         "without skip_tokenizer_init (--skip-tokenizer-init)")
    token = getattr(tok, "video_token", None)
    vid = None if token is None else tok.convert_tokens_to_ids(token)
    return [] if vid is None or vid == tok.unk_token_id else [vid]  # a tokenizer without videos


class PrunedQwen3VLForConditionalGeneration(_PerRequestPruning, Qwen3VLForConditionalGeneration):
    """Qwen3-VL with per-request visual-token pruning. Its deepstack features (added to the visual
    tokens after the first layers) are added by ``StepPruner`` to the visual tokens still present."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        c = self.config
        self._init_pruning(vllm_config, [c.image_token_id, c.video_token_id], c.text_config)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self.visipruner is not None and intermediate_tensors is None and inputs_embeds is not None:
            # vLLM's buffer of per-token deepstack features (zero rows for text), filled by embed_input_ids
            # when the step embeds images or video (else empty: decode steps)
            filled = self.use_deepstack and self.deepstack_input_embeds_num_tokens > 0
            deepstack = self._get_deepstack_input_embeds(inputs_embeds.size(0)) if filled else None
            feats = None if deepstack is None else [deepstack[f"deepstack_input_embeds_{i}"]
                                                    for i in range(self.deepstack_num_level)]
            out = self.visipruner.forward(input_ids, positions, inputs_embeds, deepstack=feats)
            if out is not None:
                self._clear_deepstack_input_embeds(inputs_embeds.size(0))
                return out
        # vLLM's own forward (not _PerRequestPruning's: this step was planned already)
        return Qwen3VLForConditionalGeneration.forward(self, input_ids, positions, intermediate_tensors,
                                                       inputs_embeds=inputs_embeds, **kwargs)


ARCHITECTURES = {
    "LlavaForConditionalGeneration": PrunedLlavaForConditionalGeneration,
    "Qwen2VLForConditionalGeneration": PrunedQwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": PrunedQwen2_5_VLForConditionalGeneration,
    "InternVLForConditionalGeneration": PrunedInternVLForConditionalGeneration,
    "Qwen3VLForConditionalGeneration": PrunedQwen3VLForConditionalGeneration,
}
