"""Tiny random models of the supported families (LLaVA, Qwen-VL, InternVL, LLaVA-NeXT/OneVision,
Idefics3/SmolVLM) built in-process, with prompt makers, for tests and benchmarks (no downloads)."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 3


def tiny_llava(
    seed: int = 0,
    *,
    hidden: int = 64,
    layers: int = 8,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 128,
    image_size: int = 32,
    patch: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    lm: str = "llama",
) -> LlavaForConditionalGeneration:
    """A random LLaVA with a Llama (``lm="llama"``) or Qwen2 (``lm="qwen2"``: q/k/v biases) language model;
    (image_size/patch)^2 visual tokens per image."""
    from transformers import Qwen2Config

    text_configs = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if lm not in text_configs:
        raise ValueError(f"lm must be 'llama' or 'qwen2', got {lm!r}")
    torch.manual_seed(seed)
    text = text_configs[lm](
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 16), image_size=image_size, patch_size=patch,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    cfg.text_config._attn_implementation = attn_implementation
    cfg.vision_config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    return model


def tokens_per_image(model) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def random_prompt(model, *, seed: int = 0, prefix: int = 5, suffix: int = 12, images: int = 1, between: int = 4):
    """input_ids (1, n) with `images` image spans and random text around them, plus pixel_values."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    per = tokens_per_image(model)

    def text(k):
        return torch.randint(4, vocab, (k,), generator=g)

    parts = [torch.tensor([1]), text(prefix - 1)]
    for i in range(images):
        parts.append(torch.full((per,), IMAGE_TOKEN_ID))
        parts.append(text(between if i < images - 1 else suffix))
    ids = torch.cat(parts)[None]
    size = model.config.vision_config.image_size
    pixels = torch.randn(images, 3, size, size, generator=g)
    return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}


# ------------------------------------------------------------------------------ Qwen2-VL family
QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_START, QWEN_VISION_END = 150, 151, 152, 153


def tiny_qwen_vl(
    seed: int = 0,
    *,
    version: str = "2",
    layers: int = 8,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    deepstack: int = 5,
):
    """A random Qwen2-VL (``version="2"``), Qwen2.5-VL (``"2.5"``) or Qwen3-VL (``"3"``): M-RoPE, patch
    4, merge 2. Qwen3-VL: interleaved M-RoPE, q/k norms, and deepstack: the features of vision
    blocks 0..deepstack-1 added to the visual tokens after language-model layers 0..deepstack-1
    (more of them than a real checkpoint's 3 of 36, so that pruning at layer 2-3 overlaps them)."""
    torch.manual_seed(seed)
    text = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ids = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_VISION_START,
               vision_end_token_id=QWEN_VISION_END)
    if version == "2":
        from transformers import Qwen2VLConfig as C, Qwen2VLForConditionalGeneration as M

        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig as C, Qwen2_5_VLForConditionalGeneration as M

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16,
                      fullatt_block_indexes=[1])
    elif version == "3":
        from transformers import Qwen3VLConfig as C, Qwen3VLForConditionalGeneration as M

        # head_dim 32 != hidden / heads, as in Qwen3-VL-4B (2560 / 32 heads of 128)
        text.update(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [8, 4, 4], "mrope_interleaved": True})
        vision = dict(depth=deepstack, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      num_position_embeddings=16, deepstack_visual_indexes=list(range(deepstack)))
    else:
        raise ValueError(f"version must be '2', '2.5' or '3', got {version!r}")
    cfg = C(text_config=text, vision_config=vision, **ids)
    cfg.text_config._attn_implementation = attn_implementation
    cfg.vision_config._attn_implementation = "sdpa"
    return M(cfg).to(dtype).eval()


def qwen_vl_prompt(model, *, seed: int = 0, images=((8, 8),), videos=(), prefix: int = 5, suffix: int = 10,
                   between: int = 3, timestamp: int = 3):
    """A Qwen-VL prompt: text, then each image (patch grid h x w) and each video (t, h, w), each
    wrapped in vision start/end tokens, then text. Qwen3-VL lays a video out frame by frame as its
    processor does: a timestamp (``timestamp`` text tokens, "<0.5 seconds>") then the frame in its
    own start/end tokens. Returns the model's keyword inputs and the [start, end) of each image and
    each video frame (merge 2: h*w/4 tokens per frame)."""
    g = torch.Generator().manual_seed(seed)
    vcfg = model.config.vision_config
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    merge = vcfg.spatial_merge_size
    vocab = 140  # ordinary text ids stay below the special ones

    def text(k):
        return torch.randint(4, vocab, (k,), generator=g).tolist()

    per_frame_runs = model.config.model_type == "qwen3_vl"
    ids, spans = [1] + text(prefix - 1), []
    out = {}
    items = [("image", (1, h, w)) for h, w in images] + [("video", tuple(v)) for v in videos]
    for i, (kind, (t, h, w)) in enumerate(items):
        per_frame = (h // merge) * (w // merge)
        ids.append(QWEN_VISION_START)
        for f in range(t if kind == "video" else 1):
            if per_frame_runs and kind == "video":
                ids += text(timestamp) + [QWEN_VISION_START]
            spans.append((len(ids), len(ids) + per_frame))
            ids += [QWEN_IMAGE if kind == "image" else QWEN_VIDEO] * per_frame
            if per_frame_runs and kind == "video":
                ids.append(QWEN_VISION_END)
        ids.append(QWEN_VISION_END)
        ids += text(between if i < len(items) - 1 else suffix)
    if images:
        out["pixel_values"] = torch.randn(sum(h * w for h, w in images), patch_dim, generator=g)
        out["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in images])
    if videos:
        # t frames of the grid are t * temporal_patch_size input frames
        out["pixel_values_videos"] = torch.randn(sum(t * h * w for t, h, w in videos), patch_dim, generator=g)
        out["video_grid_thw"] = torch.tensor([list(v) for v in videos])
    input_ids = torch.tensor([ids])
    # what the processor returns beside input_ids: 1 for image tokens, 2 for video tokens
    mm_types = (input_ids == QWEN_IMAGE).long() + 2 * (input_ids == QWEN_VIDEO).long()
    out.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=mm_types)
    return out, spans


# ------------------------------------------------------------------------------ processors
TINY_WORDS = ("what color is the shape in image a an red blue green circle square triangle yes no how many "
              "there ? . , 0 1 2 3 4 user assistant system").split()


def tiny_tokenizer(special_tokens=(), words=TINY_WORDS):
    """A word-level fast tokenizer built in-process (ids: <unk> 0, <pad> 1, words, then the special
    tokens), small enough for tiny models' vocabularies; nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *special_tokens]})
    return t


# ChatML with an image placeholder, as LLaVA-style processors expand it
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llava_with_processor(seed: int = 0, layers: int = 4, **model_kwargs):
    """A tiny LLaVA whose vocabulary is a tiny tokenizer's, and its LlavaProcessor (CLIP preprocessing,
    ChatML chat template): a complete model folder once saved with ``save_pretrained``. ``model_kwargs``
    go to ``tiny_llava`` (e.g. ``hidden=128`` for a head dimension of 32)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = tiny_tokenizer(["<image>"])
    model = tiny_llava(seed, layers=layers, vocab=len(tok) + 2, **model_kwargs)
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    size = model.config.vision_config.image_size
    ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=model.config.vision_config.patch_size,
                          vision_feature_select_strategy="default", chat_template=CHATML_TEMPLATE,
                          image_token="<image>", num_additional_image_tokens=1)
    return model, proc


# -------------------------------------------------------------------------------- Gemma3 family
GEMMA_IMAGE, GEMMA_BOI, GEMMA_EOI = 150, 151, 152


def tiny_gemma3(
    seed: int = 0,
    *,
    layers: int = 8,
    sliding_window: int = 12,
    sliding_window_pattern: int = 4,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """A random Gemma3 (SigLIP tower, 16 tokens per image): every ``sliding_window_pattern``-th
    layer full attention, the others sliding with a window of ``sliding_window`` tokens (smaller
    than an image, so prompts and images outgrow it); local and global RoPE bases differ."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                max_position_embeddings=4096, sliding_window=sliding_window,
                sliding_window_pattern=sliding_window_pattern,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                bos_token_id=2, eos_token_id=1, pad_token_id=0,
                # Gemma-2 values; Gemma3's modeling code applies neither (the tests pin that down)
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=4)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16, image_token_index=GEMMA_IMAGE,
                       boi_token_index=GEMMA_BOI, eoi_token_index=GEMMA_EOI)
    cfg.text_config._attn_implementation = attn_implementation
    cfg.vision_config._attn_implementation = "sdpa"
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # transformers starts the image projection at zero: every image token alike
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.03)
    return model.to(dtype).eval()


def gemma3_prompt(model, *, seed: int = 0, images: int = 1, prefix: int = 5, suffix: int = 8, between: int = 3):
    """A Gemma3 prompt as its processor lays it out: text, then each image's tokens between
    <start_of_image> and <end_of_image>, then text; ``token_type_ids`` 1 on the image tokens (the
    model's bidirectional image blocks). Returns the model's keyword inputs and each image's
    [start, end)."""
    g = torch.Generator().manual_seed(seed)
    per = model.config.mm_tokens_per_image

    def text(k):
        return torch.randint(4, 140, (k,), generator=g).tolist()

    ids, spans = [2] + text(prefix - 1), []
    for i in range(images):
        ids.append(GEMMA_BOI)
        spans.append((len(ids), len(ids) + per))
        ids += [GEMMA_IMAGE] * per + [GEMMA_EOI]
        ids += text(between if i < images - 1 else suffix)
    input_ids = torch.tensor([ids])
    size = model.config.vision_config.image_size
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
           "token_type_ids": (input_ids == GEMMA_IMAGE).long(),
           "pixel_values": torch.randn(images, 3, size, size, generator=g)}
    return out, spans


# ------------------------------------------------------------------ InternVL, LLaVA-NeXT/OneVision, Idefics3
# Token ids of the other families' tiny models: ordinary text stays below 140, special ids above.
MM_IMAGE, MM_VIDEO, MM_OPEN, MM_CLOSE = 150, 151, 152, 153


def tiny_text_config(kind: str = "llama", *, layers: int = 8, vocab: int = 160) -> dict:
    """A tiny Llama, Qwen2 or Qwen3 (q/k norms) language model config as a dict (hidden 64)."""
    if kind not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"kind must be 'llama', 'qwen2' or 'qwen3', got {kind!r}")
    cfg = dict(model_type=kind, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
               eos_token_id=2, pad_token_id=0)
    if kind == "qwen3":
        cfg["head_dim"] = 16
    return cfg


def _finish(model, attn_implementation: str, dtype: torch.dtype):
    model.config.get_text_config()._attn_implementation = attn_implementation
    model.config.vision_config._attn_implementation = "sdpa"
    return model.to(dtype).eval()


def visual_prompt(seed: int, items, *, prefix: int = 5, suffix: int = 10, between: int = 3):
    """input_ids (1, n) of text, then each item (a list of (token id, count) runs: visual tokens and
    the wrappers around them), then text. Returns the ids and the [start, end) of each run whose
    token id is in MM_IMAGE / MM_VIDEO, per item (a list of lists)."""
    g = torch.Generator().manual_seed(seed)

    def text(k):
        return torch.randint(4, 140, (k,), generator=g).tolist()

    ids, runs = [1] + text(prefix - 1), []
    for i, item in enumerate(items):
        mine = []
        for tok, count in item:
            if tok in (MM_IMAGE, MM_VIDEO):
                mine.append((len(ids), len(ids) + count))
            ids += [tok] * count
        runs.append(mine)
        ids += text(between if i < len(items) - 1 else suffix)
    input_ids = torch.tensor([ids])
    return input_ids, runs


def tiny_internvl(seed: int = 0, *, lm: str = "qwen3", layers: int = 8, image_size: int = 64,
                  attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """A random InternVL (HF format): patch 8, pixel shuffle 0.5, (image_size/16)^2 tokens per tile;
    language model ``lm`` ('llama', 'qwen2', 'qwen3')."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=image_size, patch_size=8)
    cfg = InternVLConfig(vision_config=vision, text_config=tiny_text_config(lm, layers=layers),
                         image_token_id=MM_IMAGE, image_seq_length=(image_size // 16) ** 2)
    return _finish(InternVLForConditionalGeneration(cfg), attn_implementation, dtype)


def internvl_prompt(model, *, seed: int = 0, tiles=(2,)):
    """An InternVL prompt: each image is ``<img>`` + its tiles' tokens (one run) + ``</img>``.
    Returns the inputs and the [start, end) of each image."""
    per = model.config.image_seq_length
    ids, runs = visual_prompt(seed, [[(MM_OPEN, 1), (MM_IMAGE, t * per), (MM_CLOSE, 1)] for t in tiles])
    size = model.config.vision_config.image_size
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(sum(tiles), 3, *size, generator=g)
    return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}, [r for rr in runs for r in rr]


def tiny_llava_next(seed: int = 0, *, onevision: bool = False, layers: int = 8, lm: str = "qwen2",
                    pinpoints=((32, 64), (64, 32), (64, 64)), attn_implementation: str = "sdpa",
                    dtype: torch.dtype = torch.float32):
    """A random LLaVA-NeXT (or LLaVA-OneVision with ``onevision=True``): CLIP tiles of 32 px, patch 8
    (16 tokens per tile, OneVision video frames pooled to 2x2), any-resolution grids of ``pinpoints``."""
    from transformers import CLIPVisionConfig

    if onevision:
        from transformers import LlavaOnevisionConfig as C, LlavaOnevisionForConditionalGeneration as M
    else:
        from transformers import LlavaNextConfig as C, LlavaNextForConditionalGeneration as M
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    ids = dict(image_token_index=MM_IMAGE, video_token_index=MM_VIDEO) if onevision else dict(image_token_index=MM_IMAGE)
    cfg = C(vision_config=vision, text_config=tiny_text_config(lm, layers=layers), vision_feature_layer=-1,
            vision_feature_select_strategy="default", image_grid_pinpoints=[list(p) for p in pinpoints],
            image_seq_length=16, **ids)
    return _finish(M(cfg), attn_implementation, dtype)


def llava_next_prompt(model, *, seed: int = 0, image_sizes=((30, 64),), video_frames: int = 0):
    """A LLaVA-NeXT / OneVision prompt: each image (original size (h, w)) is one run of image tokens
    (base tile, the unpadded any-resolution tiles and their newline tokens, counted by the model's own
    feature code); then a video of ``video_frames`` frames (OneVision): one run of frames x pooled
    tokens + a newline token. Several images in one OneVision prompt are base tiles only
    (``batch_num_images``), as its processor does. Returns the inputs and the spans: each image, and
    each video frame (the video's trailing newline token goes with its last frame)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed + 1)
    cfg, tile = model.config, model.config.vision_config.image_size
    out = {}
    if image_sizes:
        sizes = torch.tensor([list(s) for s in image_sizes])
        tiles = max(image_size_to_num_patches(s, cfg.image_grid_pinpoints, tile) for s in sizes)
        out.update(pixel_values=torch.randn(len(sizes), tiles, 3, tile, tile, generator=g), image_sizes=sizes)
        if cfg.model_type == "llava_onevision":
            out["batch_num_images"] = torch.tensor([len(sizes)])
        kw = {k: out[k] for k in ("image_sizes", "batch_num_images") if k in out}
        with torch.no_grad():
            feats = model.model.get_image_features(out["pixel_values"], **kw).pooler_output
        items = [[(MM_OPEN, 1), (MM_IMAGE, len(f)), (MM_CLOSE, 1)] for f in feats]
    else:
        items = []
    per_frame = ((tile // model.config.vision_config.patch_size + 1) // 2) ** 2
    if video_frames:
        out["pixel_values_videos"] = torch.randn(1, video_frames, 3, tile, tile, generator=g)
        items.append([(MM_OPEN, 1), (MM_VIDEO, video_frames * per_frame + 1), (MM_CLOSE, 1)])
    ids, runs = visual_prompt(seed, items)
    spans = [r for rr in runs[: len(runs) - bool(video_frames)] for r in rr]
    if video_frames:
        (s, e), = runs[-1]
        spans += [(a, a + per_frame) for a in range(s, e - per_frame - 1, per_frame)] + [(e - per_frame - 1, e)]
    out.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out, spans


def tiny_idefics3(seed: int = 0, *, smolvlm: bool = False, layers: int = 8, attn_implementation: str = "sdpa",
                  dtype: torch.dtype = torch.float32):
    """A random Idefics3 (or SmolVLM with ``smolvlm=True``): Llama language model at
    ``model.model.text_model``, sub-images of 64 px, patch 8, pixel shuffle 2: 16 tokens each."""
    if smolvlm:
        from transformers import SmolVLMConfig as C, SmolVLMForConditionalGeneration as M
    else:
        from transformers import Idefics3Config as C, Idefics3ForConditionalGeneration as M
    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                  patch_size=8)
    cfg = C(vision_config=vision, text_config=tiny_text_config("llama", layers=layers), image_token_id=MM_IMAGE,
            scale_factor=2)
    return _finish(M(cfg), attn_implementation, dtype)


def idefics3_prompt(model, *, seed: int = 0, grids=((1, 2),), pad_last: int = 0):
    """An Idefics3 / SmolVLM prompt laid out as its processor does: an image split into a rows x cols
    grid is ``<fake><row_r_col_c>`` + a sub-image's image tokens for each tile, then
    ``<fake><global-img>`` + the whole image's tokens + ``<fake>``; an unsplit image ((1, 1)) is the
    global part alone. ``pad_last`` pixels of the last sub-image are padding (zero pixels, masked in
    ``pixel_attention_mask``). Returns the inputs and the [start, end) of each sub-image's run."""
    v = model.config.vision_config
    per = (v.image_size // v.patch_size) ** 2 // model.config.scale_factor ** 2
    fake, tag = MM_OPEN, MM_CLOSE  # <fake_token_around_image>; one id for the row/col and global tags
    items = []
    for rows, cols in grids:
        item = [] if (rows, cols) == (1, 1) else [(fake, 1), (tag, 1), (MM_IMAGE, per)] * (rows * cols)
        items.append(item + [(fake, 1), (tag, 1), (MM_IMAGE, per), (fake, 1)])
    ids, runs = visual_prompt(seed, items)
    n = sum(1 if g == (1, 1) else g[0] * g[1] + 1 for g in grids)
    gen = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(1, n, 3, v.image_size, v.image_size, generator=gen)
    mask = torch.ones(1, n, v.image_size, v.image_size, dtype=torch.bool)
    if pad_last:
        mask[0, -1, :, v.image_size - pad_last:] = False
        pixels[0, -1, :, :, v.image_size - pad_last:] = 0.0
    inputs = {"input_ids": ids, "pixel_values": pixels, "pixel_attention_mask": mask,
              "attention_mask": torch.ones_like(ids)}
    return inputs, [r for rr in runs for r in rr]
