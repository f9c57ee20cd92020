"""MobileVLM folders (published layout, tiny random weights written here) loaded as a LLaVA.

The reference forward below is written from the architecture's description and reads the
checkpoint's tensors by their published names: CLIP hidden state ``mm_vision_select_layer``
without CLS -> LDP projector (V2: MLP, 2x2 average pooling, depthwise conv residual; V1: MLP,
two MobileNetV3 blocks) -> features at the image tokens -> the LLaMA.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import visipruner
from visipruner import FastVConfig, VisiPrunerConfig, VisionZipConfig
from visipruner.models import load_mobilevlm, load_model_dir
from visipruner.models.mobilevlm import V1_SYSTEM, LDPNetV2Projector, MobileVLMFormatError, pad_to_square

from test_batches import FASTV, TRIGGERING, check_rows_as_if_alone, text_only
from test_core import check_cached_generation, check_stages_match_reference
from test_methods import CASES, NO_STAGES, check_peer

torch.set_grad_enabled(False)

DIM, VISION_DIM, SQUEEZE = 64, 128, 16  # SQUEEZE: MobileNetV3's rounding of DIM / 4
VISION = dict(hidden_size=VISION_DIM, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
PUBLISHED_CLIP = "model.vision_tower.vision_tower.vision_model."
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:'-") + ["\u2581", "\n"]


def write_tokenizer(folder) -> int:
    """A LLaMA-style unigram tokenizer: <unk>, <s>, </s>, metaspace, BOS prepended; the template's
    words are single pieces (short prompts), anything else falls back to characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = {"\u2581" + w for w in (V1_SYSTEM + " USER: ASSISTANT: what is here? color how many").split()}
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(c, -10.0) for c in CHARS]
    pieces += [(w, -1.0) for w in sorted(words)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return len(pieces)


def projector_weights(kind: str, g: torch.Generator) -> dict:
    """Random projector tensors under MobileVLM's names (``model.mm_projector.*``)."""
    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    if kind == "ldpnetv2":
        w = {"mlp.mlp.0.weight": r(DIM, VISION_DIM), "mlp.mlp.0.bias": r(DIM), "mlp.mlp.2.weight": r(DIM, DIM),
             "mlp.mlp.2.bias": r(DIM), "peg.peg.0.weight": r(DIM, 1, 3, 3), "peg.peg.0.bias": r(DIM)}
    else:
        w = {"model.mlp.1.weight": r(DIM, VISION_DIM), "model.mlp.1.bias": r(DIM),
             "model.mlp.3.weight": r(DIM, DIM), "model.mlp.3.bias": r(DIM)}
        for i in (1, 2):
            b = f"model.mb_block.{i}.block."
            w.update({b + "0.0.weight": r(DIM, 1, 3, 3), b + "0.1.weight": 1 + r(DIM), b + "0.1.bias": r(DIM),
                      b + "1.fc1.weight": r(SQUEEZE, DIM, 1, 1), b + "1.fc1.bias": r(SQUEEZE),
                      b + "1.fc2.weight": r(DIM, SQUEEZE, 1, 1), b + "1.fc2.bias": r(DIM),
                      b + "2.0.weight": r(DIM, DIM, 1, 1), b + "2.1.weight": 1 + r(DIM), b + "2.1.bias": r(DIM)})
    return {"model.mm_projector." + k: v for k, v in w.items()}


def write_checkpoint(folder, kind="ldpnetv2", seed=0, vision_tower="openai/clip-vit-tiny-patch14-336", **overrides):
    """A MobileVLM folder in the published layout: config.json, model.safetensors, tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder)  # the image placeholder is not in it: the loader adds a row
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=vocab, hidden_size=DIM, intermediate_size=128, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in LlamaForCausalLM(text).state_dict().items()}
    vision = CLIPVisionModel(CLIPVisionConfig(**VISION)).state_dict()
    state.update({PUBLISHED_CLIP + k.removeprefix("vision_model."): v + 0.05 * torch.randn(v.shape, generator=g)
                  for k, v in vision.items()})
    state.update(projector_weights(kind, g))
    cfg = text.to_dict()
    cfg.update(model_type="mobilevlm", architectures=["MobileLlamaForCausalLM"], mm_vision_tower=str(vision_tower),
               vision_tower_type="clip", mm_projector_type=kind, mm_hidden_size=VISION_DIM, mm_vision_select_layer=-2,
               mm_vision_select_feature="patch", mm_use_im_start_end=False, mm_use_im_patch_token=False,
               image_aspect_ratio="pad", use_mm_proj=True)
    cfg.update(overrides)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


# ------------------------------------------------------------------ the reference, from the description
def _channel_ln(x, w, b):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, 1e-5).permute(0, 3, 1, 2)


def reference_projector(patches, state, kind):
    p = "model.mm_projector."
    b, n, _ = patches.shape
    side = int(n**0.5)
    if kind == "ldpnetv2":
        x = F.linear(F.gelu(F.linear(patches, state[p + "mlp.mlp.0.weight"], state[p + "mlp.mlp.0.bias"])),
                     state[p + "mlp.mlp.2.weight"], state[p + "mlp.mlp.2.bias"])
        grid = x.transpose(1, 2).reshape(b, DIM, side, side)
        pooled = F.avg_pool2d(grid, 2)  # 24x24 -> 12x12
        out = pooled + F.conv2d(pooled, state[p + "peg.peg.0.weight"], state[p + "peg.peg.0.bias"], padding=1, groups=DIM)
        return out.flatten(2).transpose(1, 2)
    x = F.linear(F.gelu(F.linear(patches, state[p + "model.mlp.1.weight"], state[p + "model.mlp.1.bias"])),
                 state[p + "model.mlp.3.weight"], state[p + "model.mlp.3.bias"])
    x = x.transpose(1, 2).reshape(b, DIM, side, side)
    for i, stride in ((1, 1), (2, 2)):
        w = {k[len(f"{p}model.mb_block.{i}.block."):]: v for k, v in state.items()
             if k.startswith(f"{p}model.mb_block.{i}.block.")}
        y = F.conv2d(x, w["0.0.weight"], stride=stride, padding=1, groups=DIM)
        y = _channel_ln(y, w["0.1.weight"], w["0.1.bias"])
        y = y * torch.clamp(y + 3, 0, 6) / 6  # hardswish
        s = y.mean((2, 3), keepdim=True)
        s = F.conv2d(torch.relu(F.conv2d(s, w["1.fc1.weight"], w["1.fc1.bias"])), w["1.fc2.weight"], w["1.fc2.bias"])
        y = y * torch.clamp(s + 3, 0, 6) / 6  # hard sigmoid gate
        y = _channel_ln(F.conv2d(y, w["2.0.weight"]), w["2.1.weight"], w["2.1.bias"])
        x = x + y if stride == 1 else y
    return x.flatten(2).transpose(1, 2)


def reference_logits(folder, input_ids, pixel_values, image_token_id, vision_config=None):
    cfg = json.loads((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    vision = CLIPVisionModel(vision_config or CLIPVisionConfig(**VISION)).eval()
    ours = "vision_model." if hasattr(vision, "vision_model") else ""  # transformers 4 / 5
    vision.load_state_dict({ours + k[len(PUBLISHED_CLIP):]: v for k, v in state.items() if k.startswith(PUBLISHED_CLIP)})
    hidden = vision(pixel_values, output_hidden_states=True).hidden_states[cfg["mm_vision_select_layer"]][:, 1:]
    feats = reference_projector(hidden, state, cfg["mm_projector_type"]).reshape(-1, DIM)
    llama_fields = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in ("model_type", "architectures")}
    lm = LlamaForCausalLM(LlamaConfig(**llama_fields)).eval()
    lm.load_state_dict({k: v for k, v in state.items() if k.startswith(("model.embed_tokens", "model.layers",
                                                                         "model.norm", "lm_head"))})
    ids = input_ids[0]
    is_img = ids == image_token_id
    emb = torch.zeros(len(ids), DIM)
    emb[~is_img] = state["model.embed_tokens.weight"][ids[~is_img]]
    emb[is_img] = feats
    return lm(inputs_embeds=emb[None]).logits[0]


def image(w=50, h=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def prompt_inputs(processor, question="what is here?", n_images=1):
    msgs = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return dict(processor(images=[image(seed=i) for i in range(n_images)], text=[text], return_tensors="pt"))


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("mobilevlm_v2"))
    model, processor = load_mobilevlm(folder)
    return folder, model, processor


# ------------------------------------------------------------------ loading = the architecture
@pytest.mark.parametrize("n_images", [1, 2])
def test_v2_logits_match_reference(v2, n_images):
    folder, model, processor = v2
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert isinstance(model.model.multi_modal_projector, LDPNetV2Projector)
    inputs = prompt_inputs(processor, n_images=n_images)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144 * n_images
    out = model(**inputs).logits[0]
    ref = reference_logits(folder, inputs["input_ids"], inputs["pixel_values"], model.config.image_token_id)
    vocab = ref.shape[-1]
    assert out.shape[-1] == vocab + 1  # the image placeholder's added row
    torch.testing.assert_close(out[:, :vocab], ref, atol=1e-4, rtol=0)


def test_v1_logits_match_reference(tmp_path):
    folder = write_checkpoint(tmp_path / "v1", kind="ldpnet", seed=1)
    model, processor = load_mobilevlm(folder)
    inputs = prompt_inputs(processor)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144
    out = model(**inputs).logits[0]
    ref = reference_logits(folder, inputs["input_ids"], inputs["pixel_values"], model.config.image_token_id)
    torch.testing.assert_close(out[:, : ref.shape[-1]], ref, atol=1e-4, rtol=0)


def test_vision_tower_folder_gives_the_architecture(tmp_path):
    """A local CLIP folder (here with GELU, which the weights' shapes cannot tell) is used as given."""
    clip = tmp_path / "clip"
    vcfg = CLIPVisionConfig(**{**VISION, "hidden_act": "gelu"})
    vcfg.save_pretrained(clip)
    folder = write_checkpoint(tmp_path / "ckpt", vision_tower="openai/clip-vit-large-patch14-336")
    model, processor = load_mobilevlm(folder, vision_tower=clip)
    assert model.config.vision_config.hidden_act == "gelu"
    inputs = prompt_inputs(processor)
    ref = reference_logits(folder, inputs["input_ids"], inputs["pixel_values"], model.config.image_token_id, vcfg)
    torch.testing.assert_close(model(**inputs).logits[0, :, : ref.shape[-1]], ref, atol=1e-4, rtol=0)


def test_cli_loader_detects_a_mobilevlm_folder(v2):
    folder, _, _ = v2
    model, processor = load_model_dir(folder)
    assert isinstance(model.model.multi_modal_projector, LDPNetV2Projector)
    from visipruner.data.questions import Question
    from visipruner.evaluate import evaluate

    path = folder / "q.png"
    image(40, 40).save(path)
    qs = [Question(image=str(path), question="color?", answer="red"),
          Question(image=str(path), question="how many shapes are there?", answer="2")]
    res = evaluate(model, processor, qs, batch_size=2, max_new_tokens=3, progress=False)
    assert res["overall"]["n"] == 2 and len(res["predictions"]) == 2
    # lmms-eval's dtype=auto and an eager attention request reach the MobileVLM loader too
    auto, _ = load_model_dir(folder, dtype="auto", attn_implementation="eager")
    assert next(auto.parameters()).dtype == torch.float32
    assert auto.config.text_config._attn_implementation == "eager"


# ------------------------------------------------------------------ processor
def test_chat_template_is_the_published_v1_prompt(v2):
    _, _, processor = v2
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Sure?"}]
    assert processor.apply_chat_template(msgs, add_generation_prompt=True) == (
        V1_SYSTEM + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Sure? ASSISTANT:")


def test_image_placeholder_expands_and_text_is_tokenised_per_chunk(v2):
    _, model, processor = v2
    tok, img = processor.tokenizer, model.config.image_token_id
    text = "ab <image>\ncd"
    ids = processor(images=[image()], text=text, return_tensors="pt")["input_ids"][0].tolist()
    # MobileVLM's tokenizer_image_token: each chunk tokenised alone, BOS only on the first
    assert ids == tok("ab ").input_ids + [img] * 144 + tok("\ncd", add_special_tokens=False).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    with pytest.raises(ValueError, match="placeholder"):
        processor(images=[image(), image()], text=text)


def test_images_are_padded_to_square_with_the_mean_colour(v2):
    _, _, processor = v2
    red = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = pad_to_square(red, (122, 116, 104))
    assert sq.size == (40, 40)
    assert sq.getpixel((0, 0)) == (122, 116, 104) and sq.getpixel((20, 20)) == (255, 0, 0)
    assert sq.getpixel((20, 9)) == (122, 116, 104) and sq.getpixel((20, 10)) == (255, 0, 0)
    assert pad_to_square(Image.new("RGB", (20, 40)), (1, 2, 3)).getpixel((0, 20)) == (1, 2, 3)
    pix = processor(images=[red], text="<image>", return_tensors="pt")["pixel_values"]
    ip = processor.image_processor
    torch.testing.assert_close(pix, ip(images=[sq], return_tensors="pt")["pixel_values"])
    assert pix.shape == (1, 3, 336, 336)
    # top rows are the padding: (int(255 * mean) / 255 - mean) / std, near zero after normalising
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    torch.testing.assert_close(pix[0, :, 0, 0], ((mean * 255).int() / 255 - mean) / std, atol=0.02, rtol=0)


def test_batch_is_left_padded(v2):
    _, _, processor = v2
    out = processor(images=[image(), image()], text=["<image>\na", "<image>\na longer question"],
                    padding=True, return_tensors="pt")
    mask = out["attention_mask"]
    assert mask.shape == out["input_ids"].shape and mask[0, 0] == 0 and mask[1].all() and mask[:, -1].all()


# ------------------------------------------------------------------ pruning on the loaded model
def test_visipruner_fast_path_matches_reference(v2):
    _, model, processor = v2
    check_stages_match_reference(model, prompt_inputs(processor))


def test_cached_generation_equals_recomputation(v2):
    _, model, processor = v2
    check_cached_generation(model, prompt_inputs(processor))


@pytest.mark.parametrize("name", ["fastv", "pdrop", "dart", "sparsevlm", "random"])
def test_peers_match_reference(v2, name):
    _, model, processor = v2
    cfg, rule = CASES[name]
    check_peer(model, prompt_inputs(processor), cfg, rule)


@pytest.mark.parametrize("cfg", [TRIGGERING, FASTV], ids=["visipruner", "fastv"])
def test_each_batch_row_is_pruned_as_if_alone(v2, cfg):
    _, model, processor = v2
    prompts = [prompt_inputs(processor, "how many?", n_images=2), prompt_inputs(processor),
               text_only(model, prompt_inputs(processor, "color"))]
    check_rows_as_if_alone(model, prompts, cfg, steps=3)


def test_disabled_is_bit_identical(v2):
    _, model, processor = v2
    inputs = prompt_inputs(processor)
    ref = model(**inputs).logits
    with visipruner.apply(model, NO_STAGES):
        assert torch.equal(model(**inputs).logits, ref)
    with visipruner.apply(model, FastVConfig(layer=2, keep_ratio=0.5)):
        assert model(**inputs).logits.shape != ref.shape


def test_visionzip_is_refused_clearly(v2):
    _, model, processor = v2
    inputs = prompt_inputs(processor)
    before = model(**inputs).logits
    with pytest.raises(ValueError, match="pools the patch grid"):
        visipruner.apply(model, VisionZipConfig())
    # the refusal left the model as it was, and free for another method
    assert torch.equal(model(**inputs).logits, before)
    visipruner.apply(model, FastVConfig()).remove()


# ------------------------------------------------------------------ what the loader refuses
def _edit_weights(folder, edit):
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


@pytest.mark.parametrize("field,value,match", [
    ("mm_projector_type", "mlp2x_gelu", "mm_projector_type"),
    ("vision_tower_type", "siglip", "vision_tower_type"),
    ("mm_vision_select_feature", "cls_patch", "mm_vision_select_feature"),
    ("mm_use_im_start_end", True, "mm_use_im_start_end"),
    ("mm_hidden_size", 32, "mm_hidden_size"),
    ("mm_vision_tower", "laion/CLIP-ViT-H-14", "vision_tower="),
])
def test_bad_config_fields_are_named(tmp_path, field, value, match):
    folder = write_checkpoint(tmp_path, **{field: value})
    with pytest.raises(MobileVLMFormatError, match=match):
        load_mobilevlm(folder)


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("model.mm_projector.peg.peg.0.bias"), r"missing weights: model\.mm_projector\.peg\.peg\.0\.bias"),
    (lambda s: s.pop("model.layers.3.mlp.up_proj.weight"), r"missing weights: model\.layers\.3\.mlp\.up_proj\.weight"),
    (lambda s: s.update({"model.mm_projector.extra.weight": torch.zeros(2)}), r"model\.mm_projector\.extra\.weight"),
    (lambda s: s.update({"model.something_else": torch.zeros(2)}), r"model\.something_else"),
    (lambda s: s.update({"model.mm_projector.peg.peg.0.weight": torch.zeros(DIM, 1, 5, 5)}),
     r"model\.mm_projector\.peg\.peg\.0\.weight: shape \(64, 1, 5, 5\)"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(DIM + 1)}), r"model\.norm\.weight: shape"),
])
def test_bad_weights_are_named(tmp_path, edit, match):
    folder = write_checkpoint(tmp_path)
    _edit_weights(folder, edit)
    with pytest.raises(MobileVLMFormatError, match=match):
        load_mobilevlm(folder)


@pytest.mark.parametrize("name", ["openai/clip-vit-large-patch14-336", "/training/box/clip-vit-large-patch14-336/"])
def test_known_vision_tower_is_checked_against_the_weights(tmp_path, name):
    folder = write_checkpoint(tmp_path, mm_vision_tower=name)
    with pytest.raises(MobileVLMFormatError, match="openai/clip-vit-large-patch14-336: hidden_size 128 .* != 1024"):
        load_mobilevlm(folder)


def test_vision_weights_from_the_vision_tower_folder(tmp_path):
    """A checkpoint without the tower (V1 reads it from mm_vision_tower) takes a CLIPModel folder's."""
    folder = write_checkpoint(tmp_path / "ckpt", kind="ldpnet")
    model, processor = load_mobilevlm(folder)
    inputs = prompt_inputs(processor)
    expected = model(**inputs).logits
    clip = tmp_path / "clip"
    CLIPVisionConfig(**VISION).save_pretrained(clip)
    state = load_file(str(folder / "model.safetensors"))
    tower = {"vision_model." + k[len(PUBLISHED_CLIP):]: state.pop(k) for k in list(state) if k.startswith(PUBLISHED_CLIP)}
    save_file({**tower, "text_model.embeddings.token_embedding.weight": torch.zeros(4, 8)}, str(clip / "model.safetensors"))
    save_file(state, str(folder / "model.safetensors"))
    model, processor = load_mobilevlm(folder, vision_tower=clip)
    torch.testing.assert_close(model(**prompt_inputs(processor)).logits, expected, atol=0, rtol=0)


def test_missing_vision_weights_need_a_vision_tower_folder(tmp_path):
    folder = write_checkpoint(tmp_path)
    _edit_weights(folder, lambda s: [s.pop(k) for k in list(s) if k.startswith(PUBLISHED_CLIP)])
    with pytest.raises(MobileVLMFormatError, match="vision_tower="):
        load_mobilevlm(folder)


def test_the_image_placeholder_is_never_generated(tmp_path):
    model, processor = load_mobilevlm(write_checkpoint(tmp_path))
    inputs = prompt_inputs(processor)
    img = model.config.image_token_id
    last = model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
    model.lm_head.weight[img] = 100 * last  # the added row now wins the raw logits ...
    assert int(model(**inputs).logits[0, -1].argmax()) == img
    out = model.generate(**inputs, max_new_tokens=1)
    assert int(out[0, -1]) != img  # ... and generation still never emits it


def test_a_sentencepiece_tokenizer_model_loads(tmp_path):
    """The published checkpoints ship a sentencepiece ``tokenizer.model`` (LlamaTokenizer): one trained
    here in-process replaces the fast tokenizer files, and the folder still loads and runs."""
    import io

    import sentencepiece as spm

    folder = write_checkpoint(tmp_path / "spm")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    buf = io.BytesIO()
    corpus = [V1_SYSTEM, "USER: what is here? ASSISTANT: a red circle", "how many shapes are there? 2"] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=48,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    model, processor = load_mobilevlm(folder)
    path = folder / "q.png"
    image(40, 40).save(path)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is here?"}]}],
        add_generation_prompt=True)
    batch = processor(images=[Image.open(path)], text=[prompt], return_tensors="pt")
    ids = batch["input_ids"][0]
    assert int(ids[0]) == 1  # BOS from the sentencepiece model
    n_img = int((ids == model.config.image_token_id).sum())
    assert n_img == processor.num_image_tokens
    with torch.no_grad():
        assert model(**batch).logits.shape[1] == ids.numel()
