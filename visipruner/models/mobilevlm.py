"""MobileVLM (V1 / V2) checkpoints, loaded as a plain Hugging Face ``LlavaForConditionalGeneration``.

A MobileVLM folder (the layout of Meituan-AutoML/MobileVLM's ``MobileLlamaForCausalLM``) holds a
LLaMA ``config.json`` with ``model_type: "mobilevlm"`` and the multimodal fields, weights under
the MobileVLM names (``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``,
``model.vision_tower.vision_tower.vision_model.*``, ``model.mm_projector.*``) and the tokenizer.
The model is a LLaVA in all but the projector: the CLIP tower's hidden state
``mm_vision_select_layer`` without CLS feeds a lightweight downsample projector (LDP), whose
tokens replace the image placeholder in the LLaMA's input. So ``load_mobilevlm`` builds a
transformers LLaVA and replaces *that instance's* projector with the LDP written here; the
runtime, the reference and every method then see an ordinary LLaVA.

* V2 (``ldpnetv2``): MLP (linear, GELU, linear) per patch, adaptive average pooling of the patch
  grid to 12x12 (2x2 pooling of CLIP-336/14's 24x24), a depthwise 3x3 convolution added back
  (position injection): 144 visual tokens.
* V1 (``ldpnet``): the same MLP, then two MobileNetV3 blocks (depthwise 3x3 conv, channel
  LayerNorm, hardswish, squeeze-excite with a hard-sigmoid gate, pointwise conv, channel
  LayerNorm), the first with a residual, the second with stride 2: 144 tokens for 24x24.

Offline: the vision tower's architecture comes from ``vision_tower=`` (a local CLIP folder), a
local ``mm_vision_tower`` folder, or the checkpoint's own weights' shapes with OpenAI CLIP's
conventions (``openai/*`` names; the published ``openai/clip-vit-large-patch14-336`` is checked
against its known config). Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_TOKEN = "<image>"
PROJECTOR_TYPES = ("ldpnetv2", "ldpnet")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Architectures of the published vision towers (their config.json), so no download is needed.
KNOWN_CLIP = {
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14),
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=224, patch_size=14),
}
# What every OpenAI CLIP vision tower shares and its weights' shapes do not tell.
OPENAI_CLIP_CONVENTIONS = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, head_dim=64)

# Buffers older checkpoints saved that today's modules recompute.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
# config.json fields that are MobileVLM's, not LLaMA's.
MULTIMODAL_FIELDS = (
    "mm_vision_tower", "vision_tower_type", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer",
    "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token", "image_aspect_ratio",
    "use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "image_grid_pinpoints", "vision_tower",
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
)

# The published `v1` conversation (Vicuna v1): system, " ", "USER: msg ", "ASSISTANT: msg</s>", ...
V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + V1_SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- endfor -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- ' ' if message['role'] == 'user' else '</s>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


class MobileVLMFormatError(ValueError):
    """A MobileVLM folder this loader does not understand; the message names the field or key."""


# ------------------------------------------------------------------------------ projectors
def _as_grid(x: torch.Tensor) -> torch.Tensor:
    """(b, n, c) tokens of a square patch grid -> (b, c, side, side)."""
    b, n, c = x.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"the MobileVLM projector needs a square patch grid; got {n} patch features")
    return x.transpose(1, 2).reshape(b, c, side, side)


def _channel_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of a (b, c, h, w) map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LDPNetV2Projector(nn.Module):
    """MobileVLM V2's projector: per-patch MLP, average pooling to ``grid x grid``, depthwise conv residual."""

    pools_patches = True  # the LLM's visual tokens are not the vision encoder's patches

    def __init__(self, vision_dim: int, text_dim: int, grid: int = 12):
        super().__init__()
        self.grid = grid
        self.fc1 = nn.Linear(vision_dim, text_dim)
        self.fc2 = nn.Linear(text_dim, text_dim)
        self.peg = nn.Conv2d(text_dim, text_dim, 3, padding=1, groups=text_dim)

    def num_tokens(self, grid_side: int) -> int:
        return self.grid * self.grid

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = _as_grid(self.fc2(F.gelu(self.fc1(patches))))
        x = F.adaptive_avg_pool2d(x, self.grid)
        x = x + self.peg(x)
        return x.flatten(2).transpose(1, 2)


class _MobileBlock(nn.Module):
    """MobileNetV3 inverted residual without expansion, LayerNorm over channels, hardswish, SE."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.stride = stride
        squeeze = max(8, (dim // 4 + 4) // 8 * 8)  # MobileNetV3's divisible-by-8 rounding of dim/4
        if squeeze < 0.9 * (dim // 4):
            squeeze += 8
        self.depthwise = nn.Conv2d(dim, dim, 3, stride=stride, padding=1, groups=dim, bias=False)
        self.depthwise_norm = nn.LayerNorm(dim, eps=1e-5)
        self.se_reduce = nn.Conv2d(dim, squeeze, 1)
        self.se_expand = nn.Conv2d(squeeze, dim, 1)
        self.pointwise = nn.Conv2d(dim, dim, 1, bias=False)
        self.pointwise_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(_channel_norm(self.depthwise_norm, self.depthwise(x)))
        gate = F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        y = _channel_norm(self.pointwise_norm, self.pointwise(y * gate))
        return x + y if self.stride == 1 else y


class LDPNetProjector(nn.Module):
    """MobileVLM V1's projector: per-patch MLP, then a stride-1 and a stride-2 mobile block."""

    pools_patches = True

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, text_dim)
        self.fc2 = nn.Linear(text_dim, text_dim)
        self.blocks = nn.ModuleList([_MobileBlock(text_dim, 1), _MobileBlock(text_dim, 2)])

    def num_tokens(self, grid_side: int) -> int:
        return math.ceil(grid_side / 2) ** 2

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = _as_grid(self.fc2(F.gelu(self.fc1(patches))))
        for block in self.blocks:
            x = block(x)
        return x.flatten(2).transpose(1, 2)


def _projector_names(projector_type: str) -> dict[str, str]:
    """Published name prefix under ``model.mm_projector.`` -> this module's parameter prefix."""
    if projector_type == "ldpnetv2":
        return {"mlp.mlp.0.": "fc1.", "mlp.mlp.2.": "fc2.", "peg.peg.0.": "peg."}
    names = {"model.mlp.1.": "fc1.", "model.mlp.3.": "fc2."}
    for i in (1, 2):
        ours = f"blocks.{i - 1}."
        for theirs, part in (("block.0.0.", "depthwise."), ("block.0.1.", "depthwise_norm."),
                             ("block.1.fc1.", "se_reduce."), ("block.1.fc2.", "se_expand."),
                             ("block.2.0.", "pointwise."), ("block.2.1.", "pointwise_norm.")):
            names[f"model.mb_block.{i}.{theirs}"] = ours + part
    return names


# ------------------------------------------------------------------------------ the folder
def is_mobilevlm_dir(path: str | os.PathLike) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("model_type") == "mobilevlm"
    except (OSError, json.JSONDecodeError):
        return False


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors (or, failing that, ``pytorch_model*.bin``) files."""
    files = sorted(folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            state.update(load_file(str(f)))
    else:
        for f in sorted(folder.glob("pytorch_model*.bin")):
            state.update(torch.load(str(f), map_location="cpu", weights_only=True))
    if not state:
        raise MobileVLMFormatError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")
    return state


def _require(cfg: dict, field: str, allowed=None):
    if field not in cfg:
        raise MobileVLMFormatError(f"config.json has no '{field}'")
    if allowed is not None and cfg[field] not in allowed:
        raise MobileVLMFormatError(
            f"config.json: {field} = {cfg[field]!r} is not supported (supported: {', '.join(map(repr, allowed))})")
    return cfg[field]


def _vision_config(cfg: dict, vision_state: dict, vision_tower: str | os.PathLike | None):
    """CLIPVisionConfig of the tower: from a local CLIP folder, else the weights' shapes."""
    from transformers import CLIPVisionConfig

    name = str(vision_tower) if vision_tower is not None else str(cfg["mm_vision_tower"])
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise MobileVLMFormatError(f"vision tower folder {name} has no config.json")
        return CLIPVisionConfig.from_pretrained(name, local_files_only=True), Path(name)
    if vision_tower is not None:
        raise MobileVLMFormatError(f"vision_tower={name!r} is not a local folder")
    # a training machine's local copy of a published tower (e.g. /data/clip-vit-large-patch14-336)
    name = next((known for known in KNOWN_CLIP if known.split("/")[-1] == name.rstrip("/").split("/")[-1]), name)
    if not name.startswith("openai/"):
        raise MobileVLMFormatError(
            f"config.json: mm_vision_tower = {name!r} names a hub model whose architecture is not known offline; "
            f"pass vision_tower=<a local CLIP folder>")
    pre = "vision_model."
    try:
        patch = vision_state[pre + "embeddings.patch_embedding.weight"]
        positions = vision_state[pre + "embeddings.position_embedding.weight"]
        fc1 = vision_state[pre + "encoder.layers.0.mlp.fc1.weight"]
    except KeyError as e:
        raise MobileVLMFormatError(f"missing vision tower weight model.vision_tower.vision_tower.{e.args[0]}; "
                                   "pass vision_tower=<a local CLIP folder with weights>") from None
    layers = {int(m.group(1)) for k in vision_state if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
    hidden, _, p, _ = patch.shape
    grid = math.isqrt(positions.shape[0] - 1)
    inferred = dict(hidden_size=hidden, intermediate_size=fc1.shape[0], num_hidden_layers=max(layers) + 1,
                    num_attention_heads=hidden // OPENAI_CLIP_CONVENTIONS["head_dim"],
                    image_size=grid * p, patch_size=p)
    for field, value in KNOWN_CLIP.get(name, {}).items():
        if inferred[field] != value:
            raise MobileVLMFormatError(
                f"the vision tower weights do not match {name}: {field} {inferred[field]} (from the weights' shapes) "
                f"!= {value}")
    return CLIPVisionConfig(hidden_act=OPENAI_CLIP_CONVENTIONS["hidden_act"],
                            layer_norm_eps=OPENAI_CLIP_CONVENTIONS["layer_norm_eps"], **inferred), None


VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


def _map_keys(state: dict, projector_type: str, vision_folder: Path | None,
              clip_prefix: str) -> dict[str, torch.Tensor]:
    """MobileVLM names -> LlavaForConditionalGeneration names (projector: this module's names).

    ``clip_prefix``: what transformers' CLIPVisionModel puts before ``embeddings.`` ("vision_model."
    in transformers 4, nothing in 5).
    """
    proj_names = _projector_names(projector_type)
    out, unknown = {}, []
    for key, value in state.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight":
            out[key] = value
        elif key.startswith(VISION_PREFIX):
            out["model.vision_tower." + clip_prefix + key[len(VISION_PREFIX):]] = value
        elif key.startswith("model.mm_projector."):
            rest = key[len("model.mm_projector."):]
            prefix = next((p for p in proj_names if rest.startswith(p)), None)
            if prefix is None:
                unknown.append(key)
            else:
                out["model.multi_modal_projector." + proj_names[prefix] + rest[len(prefix):]] = value
        elif key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
            out["model.language_model." + key[len("model."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise MobileVLMFormatError(f"unexpected weights for a {projector_type} MobileVLM: {', '.join(sorted(unknown)[:8])}"
                                   + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""))
    if not any(k.startswith("model.vision_tower.") for k in out) and vision_folder is not None:
        # V1 checkpoints may leave the (frozen) tower to mm_vision_tower's own weights
        tower = read_weights(vision_folder)
        if any(k.startswith("vision_model.") for k in tower):  # a CLIPModel, or a CLIPVisionModel before v5
            tower = {k[len("vision_model."):]: v for k, v in tower.items() if k.startswith("vision_model.")}
        for key, value in tower.items():
            if not key.endswith(IGNORED_SUFFIXES):
                out["model.vision_tower." + clip_prefix + key] = value
    return out


def _published_name(key: str, projector_type: str) -> str:
    """Inverse of _map_keys for error messages: the name the checkpoint should have had."""
    if key.startswith("model.vision_tower."):
        rest = key[len("model.vision_tower."):]
        return VISION_PREFIX + (rest[len("vision_model."):] if rest.startswith("vision_model.") else rest)
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.multi_modal_projector."):
        rest = key[len("model.multi_modal_projector."):]
        for theirs, ours in _projector_names(projector_type).items():
            if rest.startswith(ours):
                return "model.mm_projector." + theirs + rest[len(ours):]
    return key


def _load_strict(model: nn.Module, state: dict, projector_type: str):
    """Copy every weight; missing, unexpected or mis-shaped keys are errors naming the published key."""
    expected = model.state_dict()
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in state]
    if missing:
        names = sorted(_published_name(k, projector_type) for k in missing)
        raise MobileVLMFormatError(f"missing weights: {', '.join(names[:8])}"
                                   + (f" (+{len(names) - 8} more)" if len(names) > 8 else ""))
    extra = [k for k in state if k not in expected]
    if extra:
        raise MobileVLMFormatError(f"unexpected weights: {', '.join(sorted(_published_name(k, projector_type) for k in extra))}")
    for key, value in state.items():
        want = expected[key].shape
        if key in ("model.language_model.embed_tokens.weight", "lm_head.weight") and value.ndim == 2 \
                and value.shape[1] == want[1] and value.shape[0] <= want[0]:
            padded = torch.zeros(want, dtype=value.dtype)
            padded[: value.shape[0]] = value  # rows for tokens added here (the image placeholder)
            state[key] = value = padded
        if value.shape != want:
            raise MobileVLMFormatError(
                f"{_published_name(key, projector_type)}: shape {tuple(value.shape)} in the checkpoint, "
                f"{tuple(want)} expected from config.json")
    with torch.no_grad():
        model.load_state_dict(state, strict=not tied)
    if tied:
        model.tie_weights()


# ------------------------------------------------------------------------------ processor
def pad_to_square(image, colour: tuple[int, int, int]):
    """The image centred on a square canvas of ``colour`` (MobileVLM's ``image_aspect_ratio: pad``)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


class MobileVLMProcessor:
    """Chat template, image preprocessing and tokenisation as MobileVLM's inference code does them.

    ``<image>`` in a prompt becomes ``num_image_tokens`` copies of the image token; the text
    around it is tokenised chunk by chunk (the first chunk with BOS), as MobileVLM's
    ``tokenizer_image_token`` does, so the token ids match the published pipeline's.
    """

    def __init__(self, tokenizer, image_processor, num_image_tokens: int, pad_images: bool,
                 image_token: str = IMAGE_TOKEN, chat_template: str = CHAT_TEMPLATE):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.pad_images = pad_images
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.chat_template = chat_template

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = False, **kwargs):
        if tokenize:
            raise ValueError("MobileVLMProcessor.apply_chat_template returns the prompt text; call the processor on it")
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def preprocess_images(self, images) -> torch.Tensor:
        colour = tuple(int(m * 255) for m in self.image_processor.image_mean)
        images = [im.convert("RGB") for im in images]
        if self.pad_images:
            images = [pad_to_square(im, colour) for im in images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def tokenize(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        ids: list[int] = []
        for i, chunk in enumerate(prompt.split(self.image_token)):
            chunk_ids = tok(chunk).input_ids
            if i > 0:
                ids.extend([self.image_token_id] * self.num_image_tokens)
                if chunk_ids and chunk_ids[0] == tok.bos_token_id:
                    chunk_ids = chunk_ids[1:]
            ids.extend(chunk_ids)
        return ids

    def __call__(self, images=None, text=None, padding=False, return_tensors=None, **kwargs):
        from transformers import BatchFeature

        if text is None:
            raise ValueError("MobileVLMProcessor needs text (a prompt with one <image> per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        flat = [im for item in (images or []) for im in (item if isinstance(item, (list, tuple)) else [item])]
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(flat):
            raise ValueError(f"{n_placeholders} {self.image_token} placeholder(s) in the text but {len(flat)} image(s)")
        encoded = self.tokenizer.pad({"input_ids": [self.tokenize(t) for t in texts]}, padding=padding,
                                     return_tensors=return_tensors)
        data = dict(encoded)
        if flat:
            data["pixel_values"] = self.preprocess_images(flat)
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _image_processor(vision_config, vision_folder: Path | None):
    from transformers import CLIPImageProcessor

    if vision_folder is not None and (vision_folder / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(str(vision_folder), local_files_only=True)
    size = vision_config.image_size  # the published tower's preprocessor_config.json, at its resolution
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
                              do_convert_rgb=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)


# ------------------------------------------------------------------------------ the loader
def load_mobilevlm(path: str | os.PathLike, *, vision_tower: str | os.PathLike | None = None,
                   dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   attn_implementation: str = "sdpa"):
    """Return ``(model, processor)`` for a MobileVLM folder: a plain ``LlavaForConditionalGeneration``.

    ``vision_tower``: a local CLIP folder giving the vision tower's config (and preprocessing, and
    the weights if the checkpoint has none); default: ``mm_vision_tower`` if it is a local folder,
    else the architecture read off the checkpoint's vision weights. ``dtype`` defaults to float32.
    Anything the loader does not understand raises :class:`MobileVLMFormatError` naming the field
    or weight.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MobileVLMFormatError(f"{folder}: no config.json")
    cfg = json.loads((folder / "config.json").read_text())
    _require(cfg, "model_type", ("mobilevlm",))
    projector_type = _require(cfg, "mm_projector_type", PROJECTOR_TYPES)
    _require(cfg, "mm_vision_tower")
    if cfg.get("vision_tower_type", "clip") != "clip":
        _require(cfg, "vision_tower_type", ("clip",))
    select_layer = _require(cfg, "mm_vision_select_layer")
    if not isinstance(select_layer, int):
        raise MobileVLMFormatError(f"config.json: mm_vision_select_layer = {select_layer!r} is not an integer")
    if cfg.get("mm_vision_select_feature", "patch") != "patch":
        _require(cfg, "mm_vision_select_feature", ("patch",))
    if cfg.get("mm_use_im_start_end", False):
        raise MobileVLMFormatError("config.json: mm_use_im_start_end = true is not supported")

    weights = read_weights(folder)
    vision_state = {k[len("model.vision_tower.vision_tower."):]: v for k, v in weights.items()
                    if k.startswith("model.vision_tower.vision_tower.")}
    vision_config, vision_folder = _vision_config(cfg, vision_state, vision_tower)
    if vision_folder is None and not vision_state:
        raise MobileVLMFormatError("the checkpoint has no vision tower weights (model.vision_tower.vision_tower.*); "
                                   "pass vision_tower=<a local CLIP folder with weights>")
    mm_hidden = _require(cfg, "mm_hidden_size")
    if mm_hidden != vision_config.hidden_size:
        raise MobileVLMFormatError(f"config.json: mm_hidden_size = {mm_hidden} but the vision tower's hidden size "
                                   f"is {vision_config.hidden_size}")
    n_layers = vision_config.num_hidden_layers
    if not -(n_layers + 1) <= select_layer <= n_layers:
        raise MobileVLMFormatError(f"config.json: mm_vision_select_layer = {select_layer} is not a layer of a "
                                   f"{n_layers}-layer vision tower")

    text = {k: v for k, v in cfg.items() if k not in MULTIMODAL_FIELDS}
    # config= spares AutoTokenizer reading config.json, whose model_type transformers does not know
    tokenizer = AutoTokenizer.from_pretrained(str(folder), config=LlamaConfig(**text), local_files_only=True)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # LLaVA's convention for LLaMA tokenizers
    tokenizer.padding_side = "left"
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text["vocab_size"] = max(int(cfg["vocab_size"]), len(tokenizer))
    text_config = LlamaConfig(**text)
    grid_side = vision_config.image_size // vision_config.patch_size
    projector = (LDPNetV2Projector(vision_config.hidden_size, text_config.hidden_size) if projector_type == "ldpnetv2"
                 else LDPNetProjector(vision_config.hidden_size, text_config.hidden_size))
    num_tokens = projector.num_tokens(grid_side)
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
        vision_feature_layer=select_layer, vision_feature_select_strategy="default",
        image_seq_length=num_tokens, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config)
    model.model.multi_modal_projector = projector  # instance-level: the LLaVA MLP becomes the LDP
    clip_prefix = "vision_model." if hasattr(model.model.vision_tower, "vision_model") else ""
    _load_strict(model, _map_keys(weights, projector_type, vision_folder, clip_prefix), projector_type)
    del weights

    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.suppress_tokens = [image_token_id]  # a placeholder, never an answer
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
    model = model.to(device=device, dtype=dtype or torch.float32).eval()

    processor = MobileVLMProcessor(tokenizer, _image_processor(vision_config, vision_folder), num_tokens,
                                   pad_images=cfg.get("image_aspect_ratio") == "pad")
    return model, processor
