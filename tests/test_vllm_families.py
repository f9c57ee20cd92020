"""The vLLM plugin on InternVL (HF format) and Qwen3-VL (deepstack), against stock vLLM and the HF runtime.

Each family's tiny random model is built in-process with its own processor and saved as a model
folder (``save_for_vllm``), as ``test_vllm.py`` does for LLaVA and Qwen2-VL: a folder without a
config serves as stock vLLM does, and with FastV and a forced VisiPruner schedule every request
takes ``visipruner.apply``'s decisions and gives its tokens and log-probs, in one staggered batch of
image and text-only requests. Qwen3-VL's deepstack features are added after layers 0-2, and the
pruning starts at layer 1: only the visual tokens still present may get them.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import test_vllm as t  # its helpers; without vLLM it skips this module too (and fails under CI)
from visipruner import FastVConfig, Schedule, VisiPrunerConfig
from visipruner.testing import tiny_text_config, tiny_tokenizer
from visipruner.vllm.folders import save_for_vllm

FASTV = FastVConfig(layer=1, keep_ratio=0.25)
SCHEDULE = Schedule(fusion_layer=1, critical_tokens=[0, 5, 9, 15], exit_layer=3)  # every image has >= 16 tokens
MIDDLE_DEEP = VisiPrunerConfig(stages=("middle", "deep"), shallow_layers=1)
DEEPSTACK = 3  # Qwen3-VL: features of vision blocks 0-2 added after language-model layers 0-2


# ----------------------------------------------------------------------------------- the models
INTERNVL_IMAGE = "<IMG_CONTEXT>"


def tiny_internvl_with_processor(lm: str = "qwen2"):
    """A tiny random InternVL in the HF format (``lm``: 'llama', 'qwen2' or 'qwen3'; head dimension 32; 64-pixel
    tiles of 16 tokens, up to 4 tiles and a thumbnail) and its InternVLProcessor."""
    import transformers as tf

    extra = dict(start_image_token="<img>", end_image_token="</img>", context_image_token=INTERNVL_IMAGE,
                 video_token="<video>")
    base = tiny_tokenizer(list(extra.values()))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, unk_token="<unk>", pad_token="<pad>",
                                     extra_special_tokens=extra)
    text = dict(tiny_text_config(lm, layers=t.LAYERS, vocab=len(tok) + 2), hidden_size=128, intermediate_size=256)
    if lm == "qwen3":
        text["head_dim"] = 32
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=64,
                  patch_size=8)
    torch.manual_seed(0)
    cfg = tf.InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                            image_seq_length=16)
    model = tf.InternVLForConditionalGeneration(cfg).float().eval()
    t._redraw_language_model(model.model.language_model, model.lm_head)
    size = {"height": 64, "width": 64}
    proc = tf.InternVLProcessor(image_processor=tf.GotOcr2ImageProcessor(size=size, max_patches=4),
                                video_processor=tf.InternVLVideoProcessor(size=size), tokenizer=tok,
                                image_seq_length=16, chat_template=t.QWEN_TEMPLATE)
    return model, proc


def tiny_qwen3_vl_with_processor():
    """A tiny random Qwen3-VL (head dimension 32, interleaved M-RoPE, q/k norms, deepstack after layers
    0-2) whose vocabulary is a tiny tokenizer's, and its processor (16 to 64 pixels a side)."""
    import transformers as tf

    tok = tiny_tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in dict(
        image_token_id="<|image_pad|>", video_token_id="<|video_pad|>", vision_start_token_id="<|vision_start|>",
        vision_end_token_id="<|vision_end|>").items()}
    text = dict(vocab_size=len(tok) + 2, hidden_size=128, intermediate_size=256, num_hidden_layers=t.LAYERS,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 4, 4],
                                 "mrope_interleaved": True})
    vision = dict(depth=DEEPSTACK, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  num_position_embeddings=16, deepstack_visual_indexes=list(range(DEEPSTACK)))
    torch.manual_seed(0)
    model = tf.Qwen3VLForConditionalGeneration(tf.Qwen3VLConfig(text_config=text, vision_config=vision, **ids))
    model = model.float().eval()
    t._redraw_language_model(model.model.language_model, model.lm_head)
    with torch.no_grad():  # deepstack features as large as the token embeddings, so that their rows matter
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc1.weight.mul_(5)
            merger.linear_fc2.weight.mul_(5)
    size = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
    grid = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    proc = tf.Qwen3VLProcessor(image_processor=tf.Qwen2VLImageProcessor(size=size, **grid),
                               video_processor=tf.Qwen3VLVideoProcessor(size=size, **grid), tokenizer=tok,
                               chat_template=t.QWEN_TEMPLATE)
    return model, proc


class FamilyRequest(t.Request):
    """An image-and-text (or text-only) prompt with the family's image placeholder."""

    def __init__(self, i: int, sizes, placeholder: str):
        self.max_tokens = 4 + i
        self.images = [t._image(i).resize(s) for s in sizes]
        self.prompt = ("<|im_start|>user\n" + placeholder * len(sizes) + t.QUESTIONS[i]
                       + "<|im_end|>\n<|im_start|>assistant\n")


def _requests(placeholder: str) -> list[FamilyRequest]:
    # one tile, text only, a wide image (InternVL: 2 tiles + thumbnail), two images
    return [FamilyRequest(0, [(64, 64)], placeholder), FamilyRequest(1, [], placeholder),
            FamilyRequest(2, [(128, 64)], placeholder), FamilyRequest(3, [(64, 32), (64, 64)], placeholder)]


FAMILIES = {
    "internvl-qwen2": (lambda: tiny_internvl_with_processor("qwen2"), INTERNVL_IMAGE),
    "internvl-llama": (lambda: tiny_internvl_with_processor("llama"), INTERNVL_IMAGE),
    "internvl-qwen3": (lambda: tiny_internvl_with_processor("qwen3"), INTERNVL_IMAGE),
    "qwen3-vl": (tiny_qwen3_vl_with_processor, t.QWEN_IMAGE),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """``family(name)``: (HF model and processor, its requests, a folder maker), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            make, placeholder = FAMILIES[name]
            tiny = make()

            def folder(tag, **kwargs):
                return save_for_vllm(*tiny, tmp_path_factory.mktemp(f"{name}-{tag}"), **kwargs)

            built[name] = tiny, _requests(placeholder), folder
        return built[name]

    return get


# ----------------------------------------------------------------------------------------- tests
@contextlib.contextmanager
def _stock_class(arch: str, module: str, name: str):
    """vLLM's own class for ``arch`` while the block runs (the plugin registered once per process, at the
    first engine; the engine runs in this process, so the registry is this one)."""
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    ours = ModelRegistry.models[arch]
    ModelRegistry.register_model(arch, f"vllm.model_executor.models.{module}:{name}")
    try:
        yield
    finally:
        ModelRegistry.models[arch] = ours


STOCK = {"internvl-qwen2": ("InternVLForConditionalGeneration", "interns1", "InternS1ForConditionalGeneration"),
         "qwen3-vl": ("Qwen3VLForConditionalGeneration", "qwen3_vl", "Qwen3VLForConditionalGeneration")}


@pytest.mark.parametrize("name", STOCK)
def test_unpruned_folder_matches_stock_vllm(family, name):
    """A folder without a pruning config is served by the plugin's class as by vLLM's own (the stock
    engine: vLLM's class registered back for the architecture), tokens and log-probs."""
    tiny, requests, folder = family(name)
    answers = {}
    for engine in ("plugin", "stock"):  # two folders: vLLM caches a folder's class by its path
        with _stock_class(*STOCK[name]) if engine == "stock" else contextlib.nullcontext():
            llm = t._engine(folder(engine))
        cls = llm.apply_model(lambda model: type(model))[0]
        assert cls.__module__.startswith("visipruner.vllm" if engine == "plugin" else "vllm.model_executor.models")
        outs = llm.generate([r.vllm_prompt() for r in requests], [t._params(r.max_tokens) for r in requests],
                            use_tqdm=False)
        answers[engine] = [t._answer(o) for o in outs]
        del llm
    for (tokens, logprobs), (s_tokens, s_logprobs) in zip(answers["plugin"], answers["stock"]):
        assert tokens == s_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, s_logprobs)) < 1e-5


@pytest.mark.parametrize("name, config, schedule", [
    ("internvl-qwen2", FASTV, None), ("internvl-qwen2", MIDDLE_DEEP, SCHEDULE), ("internvl-llama", FASTV, None),
    ("qwen3-vl", FASTV, None), ("qwen3-vl", MIDDLE_DEEP, SCHEDULE),
], ids=["internvl-qwen2-fastv", "internvl-qwen2-schedule", "internvl-llama-fastv", "qwen3-vl-fastv",
        "qwen3-vl-schedule"])
def test_pruned_family_equals_hf(family, name, config, schedule):
    """Per request (one tile, several tiles, two images, text only; staggered in one batch) the plugin
    takes the HF runtime's decisions and gives its tokens and log-probs; the pruning fired."""
    tiny, requests, folder = family(name)
    if name == "qwen3-vl":  # deepstack after layers 0-2: layer 2 runs on the pruned token set (asserted below)
        assert tiny[0].config.vision_config.deepstack_visual_indexes == list(range(DEEPSTACK)) == [0, 1, 2]
    llm = t._engine(folder(config.method, config=config, schedule=schedule))
    records = t._check_against_hf(tiny, t._vllm_staggered(llm, requests), config, schedule, requests=requests)
    del llm
    assert len(records) == 3
    for rec in records:
        n = rec["visual_tokens"]
        if schedule is None:  # FastV keeps a quarter after layer 1
            assert rec["visual_tokens_per_layer"] == [n, n] + [(n + 3) // 4] * (t.LAYERS - 2)
        else:  # the schedule's critical tokens in layers 2-3, none after the exit
            assert rec["visual_tokens_per_layer"] == [n, n, 4, 4, 0, 0]


def tiny_llava_next_with_processor():
    """A tiny random LLaVA-NeXT (a family the plugin does not prune yet) and its processor."""
    import transformers as tf

    tok = tiny_tokenizer(["<image>"])
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=8)
    text = dict(tiny_text_config("qwen2", layers=2, vocab=len(tok) + 2), hidden_size=128)  # head dimension 32
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    torch.manual_seed(0)
    model = tf.LlavaNextForConditionalGeneration(tf.LlavaNextConfig(
        vision_config=vision, text_config=text, vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints, image_seq_length=16, image_token_index=tok.convert_tokens_to_ids("<image>")))
    model = model.float().eval()
    ip = tf.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pinpoints)
    proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, image_token="<image>",
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, proc


def test_unsupported_family_with_a_config_is_refused(tmp_path):
    """A family the plugin does not prune (LLaVA-NeXT) with a visipruner_config stops at engine start with
    one line naming the architecture (vLLM's own class would serve it unpruned); without a config vLLM
    serves it."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _MULTIMODAL_MODELS  # vLLM's own table (not imported)

    from visipruner.vllm.refused import REFUSED

    for arch, where in REFUSED.items():  # vLLM's own class of each, registered lazily by the plugin
        assert _MULTIMODAL_MODELS[arch] == where
        assert ModelRegistry.models[arch].module_name == "visipruner.vllm.refused"
    tiny = tiny_llava_next_with_processor()
    with pytest.raises(Exception) as e:
        t._engine(save_for_vllm(*tiny, tmp_path / "configured", config=FASTV))
    text = str(e.value)
    assert "does not prune LlavaNextForConditionalGeneration" in text and "\n" not in text
    llm = t._engine(save_for_vllm(*tiny, tmp_path / "plain"))
    out = llm.generate([{"prompt": "<|im_start|>user\n<image>\nwhat color ?", "multi_modal_data": {"image": t._image(0)}}],
                       t._params(3), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
    del llm


def test_evs_video_pruning_is_refused(family):
    """vLLM's own video pruning (EVS, Qwen-VL) under a pruning config stops at engine start, in one line."""
    with pytest.raises(Exception) as e:
        t._engine(family("qwen3-vl")[2]("evs", config=FASTV), video_pruning_rate=0.5)
    text = str(e.value)
    assert "without video_pruning_rate (--video-pruning-rate)" in text and "\n" not in text


class VideoRequest(t.Request):
    """An InternVL prompt with a 4-frame video (64 visual tokens: 16 per frame)."""

    def __init__(self):
        import numpy as np

        self.max_tokens, self.images = 6, []
        self.videos = [(np.random.RandomState(0).rand(4, 64, 64, 3) * 255).astype("uint8")]
        self.prompt = "<|im_start|>user\n<video>\n" + t.QUESTIONS[0] + "<|im_end|>\n<|im_start|>assistant\n"

    def vllm_prompt(self) -> dict:
        return {"prompt": self.prompt, "multi_modal_data": {"video": self.videos[0]}}


def test_internvl_video_frames_equal_hf(family):
    """InternVL's video frames (vLLM: runs of the tokenizer's video token; transformers: of the image
    token) are pruned as the HF runtime prunes them: FastV's decisions, tokens and log-probs (on the
    Qwen3 language model: q/k norms)."""
    tiny, _, folder = family("internvl-qwen3")
    request = VideoRequest()
    llm = t._engine(folder("video", config=FASTV), limit_mm_per_prompt={"image": 0, "video": 1})
    out = llm.generate([request.vllm_prompt()], t._params(request.max_tokens), use_tqdm=False)[0]
    del llm
    tokens, logprobs, stats, prompt = t._hf(tiny, request, FASTV)
    tok = tiny[1].tokenizer
    video, image = tok.convert_tokens_to_ids("<video>"), tok.context_image_token_id
    assert [image if i == video else i for i in out.prompt_token_ids] == prompt and video in out.prompt_token_ids
    v_tokens, v_logprobs = t._answer(out)
    assert v_tokens == tokens
    assert max(abs(a - b) for a, b in zip(v_logprobs, logprobs)) < 1e-4
    rec = t._record(out.prompt_token_ids)
    assert rec["visual_tokens_per_layer"] == stats.visual_tokens_per_layer == [64, 64] + [16] * (t.LAYERS - 2)
