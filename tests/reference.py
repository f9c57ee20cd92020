"""A slow, obviously-correct VisiPruner, written from docs/method.md and nothing else.

Full eager attention with the whole (n x n) probability matrix, stage-1 edits made directly on
that matrix, influence from the full matrix's last row, tokens removed by indexing the hidden
states. It shares no code with the package: it only reads the model's weights.
"""

from __future__ import annotations

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


def _rope(model, positions, dtype):
    """cos/sin for the given absolute positions, computed from the config's rope theta."""
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def input_embeddings(model, input_ids, pixel_values):
    emb = model.model.get_input_embeddings()(input_ids)[0]
    if pixel_values is not None:
        feats = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        feats = torch.cat(list(feats), dim=0).to(emb.dtype)
        is_img = input_ids[0] == model.config.image_token_id
        emb = emb.clone()
        emb[is_img] = feats
    return emb


@torch.no_grad()
def reference_forward(model, input_ids, pixel_values, cfg, schedule=None, drop_rule=None, selection="influence") -> RefResult:
    """Run the VisiPruner semantics on a batch-1 prompt; ``cfg`` a VisiPrunerConfig-like object.

    With ``schedule`` (fusion_layer, critical_tokens, exit_layer) the decisions are forced
    instead of measured (used to replay a prompt's decisions on a longer sequence).
    ``drop_rule(layer, last_row_probs (H, m_vis), visual_ids, layer_input_hidden (m_vis, d))``
    returning visual ids to keep (or None) replaces stages 2-3 (peer methods). A rule with
    ``wants_text = True`` also gets ``text_probs`` (head-mean attention of the text rows after the
    first image on the visual tokens) and may return ``(keep_ids, merges)`` to recycle tokens.
    ``selection="attention"``: the critical set has the same size but is chosen by attention.
    """
    lm = model.model.language_model
    tcfg = model.config.text_config
    H, Hkv = tcfg.num_attention_heads, tcfg.num_key_value_heads
    hd = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // H
    scale = hd**-0.5
    stages = set(cfg.stages)
    K = cfg.shallow_layers

    h = input_embeddings(model, input_ids, pixel_values)
    n = h.shape[0]
    pos = torch.arange(n)
    is_img = (input_ids[0] == model.config.image_token_id)
    vis_id = torch.full((n,), -1)
    vis_id[is_img] = torch.arange(int(is_img.sum()))
    # each image's first token (maximal runs of image tokens)
    starts = [i for i in range(n) if is_img[i] and (i == 0 or not is_img[i - 1])]
    image_of = torch.full((n,), -1)
    for g, s in enumerate(starts):
        e = s
        while e < n and is_img[e]:
            image_of[e] = g
            e += 1

    res = RefResult(logits=None, positions=None)
    fusion = exit_ = None
    critical = None
    count = 0
    for li, layer in enumerate(lm.layers):
        m = h.shape[0]
        h_in = h
        res.visual_tokens_per_layer.append(int((vis_id >= 0).sum()))
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(m, H, hd).transpose(0, 1)
        k = attn.k_proj(x).view(m, Hkv, hd).transpose(0, 1)
        v = attn.v_proj(x).view(m, Hkv, hd).transpose(0, 1)
        cos, sin = _rope(model, pos, h.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(H // Hkv, dim=0)
        v = v.repeat_interleave(H // Hkv, dim=0)
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
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
        elif schedule is not None:
            if li == schedule.fusion_layer:
                fusion, critical = li, torch.tensor(schedule.critical_tokens, dtype=torch.long)
                keep_ids = critical
            elif li == schedule.exit_layer:
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
                    if float(cs.min()) < cfg.layer_threshold:
                        fusion = li
                        score = nrm / out_last.norm() if cfg.relative_tokens_threshold else nrm
                        chosen = score > cfg.tokens_threshold
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

        h = h + attn.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))

        if merges and li + 1 < len(lm.layers):  # recycled tokens: mean of the states entering the next layer
            h = h.clone()
            for dest, sources in merges:
                rows = [int((vis_id == t).nonzero()) for t in [dest] + list(sources)]
                h[rows[0]] = h[rows].float().mean(0).to(h.dtype)
        if keep_ids is not None and li + 1 < len(lm.layers):  # removal acts from the next layer on
            keep = (vis_id < 0) | torch.isin(vis_id, keep_ids)
            h, pos, vis_id, image_of = h[keep], pos[keep], vis_id[keep], image_of[keep]

    h = lm.norm(h)
    res.logits = model.lm_head(h)
    res.positions = pos
    res.fusion_layer, res.exit_layer = fusion, exit_
    res.critical_tokens = [] if critical is None else sorted(critical.tolist())
    return res
