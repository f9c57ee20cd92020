"""FLOPs of what actually ran in the language model, and FastV's formula for comparison.

Convention: 2 FLOPs per multiply-accumulate of the matrix products (q/k/v/o projections with
GQA's smaller k/v, attention scores, attention-weighted sums, the 3 SwiGLU matrices).
Norms, RoPE, softmax and the LM head are not counted. Attention is counted per (query, key)
pair actually evaluated, so causal attention counts n(n+1)/2 pairs, not n^2.

The vision encoder and the projector are counted separately (:func:`vision_flops`, reported as
``PruneStats.vision_flops``), outside the prefill figures and ratios, which are the language
model's: no method here prunes inside the encoder, so it costs the same pruned or not.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    hidden: int  # d
    q_dim: int  # heads * head_dim
    kv_dim: int  # kv_heads * head_dim
    intermediate: int  # m
    num_layers: int

    @classmethod
    def from_config(cls, cfg) -> "Dims":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            hidden=cfg.hidden_size,
            q_dim=cfg.num_attention_heads * head_dim,
            kv_dim=cfg.num_key_value_heads * head_dim,
            intermediate=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
        )


def dense_token_flops(dims: Dims, n: int) -> int:
    """Projections and MLP for n tokens in one layer."""
    d = dims.hidden
    proj = 2 * n * (d * dims.q_dim + 2 * d * dims.kv_dim + dims.q_dim * d)
    mlp = 2 * n * 3 * d * dims.intermediate
    return proj + mlp


def attention_flops(dims: Dims, score_pairs: int, weighted_pairs: int) -> int:
    return 2 * dims.q_dim * (score_pairs + weighted_pairs)


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def influence_flops(dims: Dims, n_keys: int, n_visual: int) -> int:
    """Last-row scores (2nq) and output (2nq), c_j (q per token), o - c_j (q), three dots (6q)."""
    return 4 * dims.q_dim * n_keys + 8 * dims.q_dim * n_visual


def text_rows_flops(dims: Dims, n_rows: int, n_keys: int) -> int:
    """Scores of extra query rows against every key (2 q_dim per pair), e.g. SparseVLM's raters."""
    return 2 * dims.q_dim * n_rows * n_keys


def layer_flops(dims: Dims, n_queries: int, score_pairs: int, weighted_pairs: int, extra: int = 0) -> int:
    return dense_token_flops(dims, n_queries) + attention_flops(dims, score_pairs, weighted_pairs) + extra


def fastv_layer_flops(dims: Dims, n: int) -> int:
    """FastV's per-layer figure 4nd^2 + 2n^2d + 2ndm (the one published tables quote)."""
    d = dims.hidden
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * dims.intermediate


def shallow_prefill_pairs(is_visual: list[bool], mode: str, spans: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """(score pairs, weighted-sum pairs) of one shallow-stage prefill layer, as the kernels run it.

    ``is_visual`` describes the layer's sequence. Kernels (see ``runtime``):
    * merge (layer 0): rows up to the first visual token: causal SDPA. Each visual span's rows:
      attention with log-sum-exp over earlier non-visual keys, earlier visual keys and the
      span's own keys (causal); the a.v of all three run. Text rows after the first visual token:
      scores on all earlier keys, a.v on non-visual keys, plus one merged vector per image seen.
    * disable: rows up to the last visual token: causal SDPA; text rows after: scores on all
      earlier keys, a.v on non-visual keys.
    * disable_renorm: as disable, but text rows score only non-visual keys.
    ``spans`` are the merge targets (default: maximal runs; video frames split a run).
    """
    n = len(is_visual)
    vis_idx = [i for i, v in enumerate(is_visual) if v]
    if not vis_idx:
        p = causal_pairs(n)
        return p, p
    first, last = vis_idx[0], vis_idx[-1]
    score = weighted = 0
    prefix = first + 1 if mode == "merge" else last + 1
    score += causal_pairs(prefix)
    weighted += causal_pairs(prefix)
    spans = visual_spans(is_visual) if spans is None else spans
    starts = {s for s, _ in spans}
    if mode == "merge":
        for s, e in spans:
            length = e - s
            earlier_vis = sum(1 for i in vis_idx if i < s)
            earlier_nonvis = s - earlier_vis
            pairs = length * earlier_nonvis + causal_pairs(length) + length * earlier_vis
            score += pairs
            weighted += pairs
    nonvis_seen = vis_seen = images_seen = 0
    for i, v in enumerate(is_visual):
        if v:
            vis_seen += 1
            if i in starts:
                images_seen += 1
            continue
        nonvis_seen += 1
        if i < first:
            continue
        # a text row after the first visual token
        score += nonvis_seen + (0 if mode == "disable_renorm" else vis_seen)
        weighted += nonvis_seen + (images_seen if mode == "merge" else 0)
    return score, weighted


def shallow_decode_pairs(n_keys: int, n_visual_keys: int, n_images: int, mode: str) -> tuple[int, int]:
    """(score, weighted) pairs of one text query attending to a shallow layer's cache."""
    nonvis = n_keys - n_visual_keys
    score = nonvis if mode == "disable_renorm" else n_keys
    weighted = nonvis + (n_images if mode == "merge" else 0)
    return score, weighted


def visual_spans(is_visual: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [s, e) of visual tokens; each run is one image."""
    spans, start = [], None
    for i, v in enumerate(list(is_visual) + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append((start, i))
            start = None
    return spans


@dataclass(frozen=True)
class VisionDims:
    """A LLaVA's vision tower (a CLIP ViT, every layer runs) and its two-layer projector."""

    hidden: int
    intermediate: int
    num_layers: int
    patches: int  # per image
    patch_pixels: int  # channels * patch_size**2
    projector_in: int  # hidden * number of feature layers concatenated
    projector_out: int  # the language model's hidden size
    tokens_per_image: int  # image tokens in the prompt per image (patches, + CLS with the "full" strategy)

    @classmethod
    def from_config(cls, cfg) -> "VisionDims | None":
        """From a LLaVA config; None when the model has no vision_config."""
        vc = getattr(cfg, "vision_config", None)
        if vc is None:
            return None
        layers = cfg.vision_feature_layer
        return cls(hidden=vc.hidden_size, intermediate=vc.intermediate_size, num_layers=vc.num_hidden_layers,
                   patches=(vc.image_size // vc.patch_size) ** 2, patch_pixels=vc.num_channels * vc.patch_size ** 2,
                   projector_in=vc.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1),
                   projector_out=cfg.text_config.hidden_size,
                   tokens_per_image=(vc.image_size // vc.patch_size) ** 2
                   + (cfg.vision_feature_select_strategy == "full"))


def vision_flops(vd: VisionDims, num_images: int, projected_tokens: int) -> int:
    """Vision tower for ``num_images`` images plus the projector on ``projected_tokens`` tokens.

    Per image: the patch embedding (a convolution: one matrix product per patch), then per layer
    the q/k/v/o projections, full (non-causal) attention over patches + CLS, and the 2-matrix
    MLP. The projector counts what it ran on (fewer tokens for VisionZip, whose scoring key
    projection of the feature layer is not counted).
    """
    d, n = vd.hidden, vd.patches + 1  # + CLS
    embed = 2 * vd.patches * vd.patch_pixels * d
    layer = 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * n * 2 * d * vd.intermediate
    projector = 2 * projected_tokens * (vd.projector_in * vd.projector_out + vd.projector_out * vd.projector_out)
    return num_images * (embed + vd.num_layers * layer) + projector
