"""A slow, obviously-correct VisiPruner, written from docs/method.md and nothing else.

Full eager attention with the whole (n x n) probability matrix, stage-1 edits made directly on
that matrix, influence from the full matrix's last row, tokens removed by indexing the hidden
states. It shares no code with the package: it only reads the model's weights.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class RefResult:
    logits: torch.Tensor  # (kept tokens, vocab), rows in original-position order
    positions: torch.Tensor  # original positions of those rows
    fusion_layer: int | None = None
    exit_layer: int | None = None
    critical_tokens: list[int] = field(default_factory=list)
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    min_cos: dict = field(default_factory=dict)  # layer -> min_j cos(o - c_j, o)
    norms: dict = field(default_factory=dict)  # layer -> ||c_j|| of the visual tokens present
    output_norms: dict = field(default_factory=dict)  # layer -> ||o|| of the last token


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class _Captured(Exception):
    pass


def text_model(model):
    """The family's language model (decoder stack): ``model.model.language_model``, or
    ``model.model.text_model`` (Idefics3, SmolVLM)."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model


def language_model_inputs(model, input_ids, pixel_values, **extra):
    """What the family's own multimodal code hands its language model for this prompt: the input
    embeddings (visual features merged in), the rotary position ids (M-RoPE for Qwen-VL) and any
    per-layer visual additions (Qwen3-VL's deepstack). Captured at the language model's door; the
    language model itself is not run."""
    lm = text_model(model)
    got = {}

    def grab(module, args, kwargs):
        got.update(kwargs)
        raise _Captured

    h = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        kw = dict(extra)
        if pixel_values is not None:
            kw["pixel_values"] = pixel_values
        model.model(input_ids=input_ids, use_cache=False, **kw)
    except _Captured:
        pass
    finally:
        h.remove()
    return got


def _rope_tables(model, lm, h, position_ids, layer_type):
    """cos/sin of every original position, from the family's own rotary module."""
    n = h.shape[0]
    if position_ids is None:
        position_ids = torch.arange(n)[None]
    if layer_type is not None:
        return lm.rotary_emb(h[None], position_ids, layer_type)
    return lm.rotary_emb(h[None], position_ids)


def visibility(n, layer_type, sliding_window, image_blocks, pos):
    """(m, m) bool: query i sees key j. Causal by original position, and tokens of one image block
    (bidirectional families) see each other whatever their order; a sliding layer then sees no key
    ``sliding_window`` or more positions back (transformers: AND(window, OR(causal, block)), so a
    block longer than the window is cut too, looking back only)."""
    qi, kj = pos[:, None], pos[None, :]
    allowed = kj <= qi
    if image_blocks is not None:
        blk = image_blocks
        allowed = allowed | ((blk[:, None] >= 0) & (blk[:, None] == blk[None, :]))
    if layer_type == "sliding_attention" and sliding_window:
        allowed = allowed & (qi - kj < sliding_window)
    return allowed


# Families whose images attend to themselves bidirectionally (transformers' token_type_ids masks)
BIDIRECTIONAL_IMAGE_FAMILIES = ("gemma3",)


def bidirectional_blocks(model, extra_inputs, n):
    """(n,) block number of each token, -1 outside blocks, or None. In a bidirectional family each
    maximal run of token type 1 (the image tokens, as the processor marks them) is one block;
    without ``token_type_ids`` the model's mask is plain causal."""
    types = extra_inputs.get("token_type_ids")
    if model.config.model_type not in BIDIRECTIONAL_IMAGE_FAMILIES or types is None:
        return None
    in_block = types[0] == 1
    blocks = torch.full((n,), -1)
    b = -1
    for i in range(n):
        if in_block[i]:
            if i == 0 or not in_block[i - 1]:
                b += 1
            blocks[i] = b
    return blocks


@torch.no_grad()
def _budget(cfg, num_visual):
    """Budget mode's token count, from the config's fields (written out here, not cfg.budget)."""
    ratio, tokens = getattr(cfg, "keep_ratio", None), getattr(cfg, "keep_tokens", None)
    if tokens is not None:
        return min(tokens, num_visual)
    if ratio is not None:  # ceil(ratio * n), at least one token
        n = int(ratio * num_visual)
        if n < ratio * num_visual - 1e-9:
            n += 1
        return max(1, min(n, num_visual))
    return None


def reference_forward(model, input_ids, pixel_values, cfg, schedule=None, drop_rule=None, selection="influence",
                      *, extra_inputs=None, spans=None, input_keep=None) -> RefResult:
    """Run the VisiPruner semantics on a batch-1 prompt; ``cfg`` a VisiPrunerConfig-like object.

    With ``schedule`` (fusion_layer, critical_tokens, exit_layer) the decisions are forced
    instead of measured (used to replay a prompt's decisions on a longer sequence).
    ``drop_rule(layer, last_row_probs (H, m_vis), visual_ids, layer_input_hidden (m_vis, d))``
    returning visual ids to keep (or None) replaces stages 2-3 (peer methods). A rule with
    ``wants_text = True`` also gets ``text_probs`` (head-mean attention of the text rows after the
    first image on the visual tokens) and may return ``(keep_ids, merges)`` to recycle tokens.
    ``selection="attention"``: the critical set has the same size but is chosen by attention.
    ``extra_inputs``: the family's other processor outputs (grids, sizes, token types).
    ``spans``: [start, end) of each image / video frame (the shallow stage's merge targets);
    default each maximal run of visual tokens.
    ``input_keep``: visual ids kept before the language model (CDPruner, DivPrune); the others are
    deleted from the input embeddings before layer 0, every kept token keeping its position.
    """
    lm = text_model(model)
    tcfg = lm.config
    H, Hkv = tcfg.num_attention_heads, tcfg.num_key_value_heads
    hd = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // H
    stages = set(cfg.stages)
    K = cfg.shallow_layers

    got = language_model_inputs(model, input_ids, pixel_values, **(extra_inputs or {}))
    h = got["inputs_embeds"][0]
    n = h.shape[0]
    position_ids = got.get("position_ids")
    deepstack = got.get("deepstack_visual_embeds")
    layer_types = getattr(tcfg, "layer_types", None) or ["full_attention"] * len(lm.layers)
    per_type = "layer_type" in inspect.signature(lm.rotary_emb.forward).parameters  # Gemma3: local/global bases
    ropes = {t: _rope_tables(model, lm, h, position_ids, t if per_type else None) for t in set(layer_types)}
    pos = torch.arange(n)
    visual_ids = [getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None)]
    visual_ids = torch.tensor([t for t in visual_ids if t is not None])
    is_img = torch.isin(input_ids[0], visual_ids)
    vis_id = torch.full((n,), -1)
    vis_id[is_img] = torch.arange(int(is_img.sum()))
    if spans is None:  # each maximal run of visual tokens
        spans, i = [], 0
        while i < n:
            if is_img[i]:
                j = i
                while j < n and is_img[j]:
                    j += 1
                spans.append((i, j))
                i = j
            else:
                i += 1
    starts = [s for s, _ in spans]
    image_of = torch.full((n,), -1)
    for g, (s, e) in enumerate(spans):
        image_of[s:e] = g
    blocks = bidirectional_blocks(model, extra_inputs or {}, n)
    gemma_like = hasattr(lm.layers[0], "pre_feedforward_layernorm")

    if input_keep is not None:
        keep = (vis_id < 0) | torch.isin(vis_id, torch.as_tensor(input_keep, dtype=torch.long))
        h, pos, vis_id, image_of = h[keep], pos[keep], vis_id[keep], image_of[keep]

    res = RefResult(logits=None, positions=None)
    fusion = exit_ = None
    critical = None
    count = 0
    for li, layer in enumerate(lm.layers):
        m = h.shape[0]
        h_in = h
        blocks_k = None if blocks is None else blocks[pos]
        res.visual_tokens_per_layer.append(int((vis_id >= 0).sum()))
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(m, H, hd)
        k = attn.k_proj(x).view(m, Hkv, hd)
        v = attn.v_proj(x).view(m, Hkv, hd).transpose(0, 1)
        if hasattr(attn, "q_norm"):  # per-head q/k norms (Qwen3, Gemma3) before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(0, 1), k.transpose(0, 1)
        cos, sin = ropes[layer_types[li]]
        cos, sin = cos[0][pos].to(h.dtype), sin[0][pos].to(h.dtype)  # kept tokens keep their positions
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(H // Hkv, dim=0)
        v = v.repeat_interleave(H // Hkv, dim=0)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        # no logit softcapping: Gemma3 keeps attn/final_logit_softcapping in its config but its
        # attention and Gemma3ForConditionalGeneration apply neither (transformers 5.23)
        allowed = visibility(m, layer_types[li], getattr(tcfg, "sliding_window", None),
                             None if blocks is None else blocks_k, pos)
        scores = scores.masked_fill(~allowed, float("-inf"))
        P = torch.softmax(scores.float(), dim=-1).to(h.dtype)  # (H, m, m)

        cur_vis = vis_id >= 0
        if "shallow" in stages and li < K and cur_vis.any():
            first = int(cur_vis.nonzero()[0])
            after = torch.arange(m) > first
            text_rows = (after & ~cur_vis).nonzero().squeeze(-1)
            if li == 0:
                rows = after.nonzero().squeeze(-1)
                removed = {}
                for g, s in enumerate(starts):
                    cols = (image_of == g).nonzero().squeeze(-1)
                    removed[s] = P[:, :, cols].sum(-1)  # (H, m)
                for r in rows.tolist():
                    P[:, r, cur_vis] = 0.0
                for t in text_rows.tolist():
                    for s, mass in removed.items():
                        P[:, t, s] += mass[:, t]
            else:
                for t in text_rows.tolist():
                    P[:, t, cur_vis] = 0.0
                    if cfg.shallow_renormalise:
                        P[:, t] = P[:, t] / P[:, t].sum(-1, keepdim=True)

        o = (P @ v).transpose(0, 1).reshape(m, H * hd)  # per query, heads concatenated

        keep_ids = None  # visual ids to keep after this layer (None: all)
        merges = []  # (dest visual id, source visual ids): token recycling
        if drop_rule is not None:
            if cur_vis.any():
                vcols = cur_vis.nonzero().squeeze(-1)
                extra = {}
                if getattr(drop_rule, "wants_text", False):
                    first = int(vcols[0])
                    trows = [r for r in range(m) if r > first and not cur_vis[r]]
                    extra["text_probs"] = P[:, trows][:, :, vcols].float().mean(0)  # (rows, m_vis)
                keep_ids = drop_rule(li, P[:, -1, vcols], vis_id[vcols], h_in[vcols], **extra)
                if isinstance(keep_ids, tuple):
                    keep_ids, merges = keep_ids
        elif getattr(cfg, "exit_by", None) is not None and exit_ is None and li >= cfg.exit_by - 1:
            exit_, keep_ids = li, torch.tensor([], dtype=torch.long)  # the bound: every visual token leaves
        elif schedule is not None:
            if li == schedule.fusion_layer:
                fusion, critical = li, torch.tensor(schedule.critical_tokens, dtype=torch.long)
                keep_ids = critical
            elif li == schedule.exit_layer and exit_ is None:
                exit_, keep_ids = li, torch.tensor([], dtype=torch.long)
        elif li > K and cur_vis.any():
            middle_open = "middle" in stages and fusion is None
            deep_open = "deep" in stages and exit_ is None and (fusion is not None or "middle" not in stages)
            if middle_open or deep_open:
                a = P[:, -1, :]  # last token's row, (H, m)
                vcols = cur_vis.nonzero().squeeze(-1)
                c = (a[:, vcols, None] * v[:, vcols, :]).transpose(0, 1).reshape(len(vcols), H * hd)
                out_last = o[-1]
                cs = F.cosine_similarity(out_last[None] - c, out_last[None].expand_as(c), dim=-1)
                nrm = c.norm(dim=-1)
                res.min_cos[li] = float(cs.min())
                res.norms[li] = nrm.clone()
                res.output_norms[li] = float(out_last.norm())
                if middle_open:
                    fallback = getattr(cfg, "fusion_fallback_layer", None)
                    if float(cs.min()) < cfg.layer_threshold or (fallback is not None and li >= fallback):
                        fusion = li
                        score = nrm / out_last.norm() if cfg.relative_tokens_threshold else nrm
                        chosen = score > cfg.tokens_threshold
                        budget = _budget(cfg, int(is_img.sum()))
                        if budget is not None:  # the `budget` largest ||c_j||, earlier token first on ties
                            ranked = sorted(range(len(nrm)), key=lambda j: (-float(nrm[j]), j))
                            chosen = torch.tensor([j in ranked[:budget] for j in range(len(nrm))])
                        if selection == "attention":
                            n_sel = int(chosen.sum())
                            chosen = torch.zeros_like(chosen)
                            chosen[a[:, vcols].mean(0).argsort(descending=True, stable=True)[:n_sel]] = True
                        critical = vis_id[vcols][chosen]
                        keep_ids = critical
                else:
                    if float(cs.min()) >= cfg.exit_threshold:
                        count += 1
                    elif cfg.exit_counting == "consecutive":
                        count = 0
                    if count >= cfg.exit_patience:
                        exit_, keep_ids = li, torch.tensor([], dtype=torch.long)

        if gemma_like:  # norms after attention and around the MLP
            h = h + layer.post_attention_layernorm(attn.o_proj(o))
            h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        else:
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if deepstack is not None and li < len(deepstack):  # Qwen3-VL: vision features added after layer li
            rows = (vis_id >= 0).nonzero().squeeze(-1)
            h = h.clone()
            h[rows] = h[rows] + deepstack[li][vis_id[rows]].to(h.dtype)

        if merges and li + 1 < len(lm.layers):  # recycled tokens: mean of the states entering the next layer
            h = h.clone()
            for dest, sources in merges:
                rows = [int((vis_id == t).nonzero()) for t in [dest] + list(sources)]
                h[rows[0]] = h[rows].float().mean(0).to(h.dtype)
        if keep_ids is not None and li + 1 < len(lm.layers):  # removal acts from the next layer on
            keep = (vis_id < 0) | torch.isin(vis_id, keep_ids)
            keep[-1] = True  # the prompt's last token is never removed (method.md)
            h, pos, vis_id, image_of = h[keep], pos[keep], vis_id[keep], image_of[keep]

    h = lm.norm(h)
    res.logits = model.lm_head(h)
    res.positions = pos
    res.fusion_layer, res.exit_layer = fusion, exit_
    res.critical_tokens = [] if critical is None else sorted(critical.tolist())
    return res
