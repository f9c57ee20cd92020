"""Attention kernels for the parts of a layer that a pruning method changes.

Everything here works on one layer's post-RoPE states: ``q`` of shape (b, H, q, d) and ``k, v`` of
shape (b, Hkv, k, d). Bulk attention is left to SDPA; these kernels only handle

* text-query rows whose probabilities on visual keys are zeroed (VisiPruner's shallow stage),
  in the exact cheap form ``out = softmax-restricted a.v * Z_nonvis / Z_all``: only ``q.k`` is
  computed for visual keys, never ``a.v``;
* visual-query rows of layer 0 (all visual keys zeroed, no merge), through an attention call that
  also returns the log-sum-exp, so no (visual x visual) probability matrix is kept;
* the last prompt token's attention row, from which influence (``cos(o - c_j, o)``, ``||c_j||``)
  is computed in O(n d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(b, Hkv, n, d) -> (b, Hkv * n_rep, n, d), each kv head repeated for its query group."""
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning (output (b,H,q,d), float32 log-sum-exp of the scores (b,H,q)).

    ``k, v`` must already have H heads. ``causal`` aligns query i with key i (q and k same length).
    Empty key sets give output 0 and lse -inf.
    """
    b, h, nq, d = q.shape
    if k.shape[2] == 0:
        return q.new_zeros(b, h, nq, v.shape[-1]), q.new_full((b, h, nq), NEG_INF, dtype=torch.float32)
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )[:2]
        return out, lse.float()
    # Portable path: chunked over queries so at most (chunk x k) scores exist at once.
    outs, lses = [], []
    chunk = 256
    for s in range(0, nq, chunk):
        qs = q[:, :, s : s + chunk]
        scores = torch.matmul(qs, k.transpose(-1, -2)).float() * scale
        if causal:
            qi = torch.arange(s, s + qs.shape[2], device=q.device)[:, None]
            ki = torch.arange(k.shape[2], device=q.device)[None, :]
            scores = scores.masked_fill(ki > qi, NEG_INF)
        lse = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - lse[..., None]).to(v.dtype)
        outs.append(torch.matmul(p, v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _complement_runs(spans: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    runs, at = [], 0
    for s, e in spans:
        if s > at:
            runs.append((at, s))
        at = e
    if at < n:
        runs.append((at, n))
    return runs


def text_rows_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor | None,
    visual_spans: list[tuple[int, int]],
    merge: bool,
    renormalise: bool,
    visible: torch.Tensor | None = None,
    merge_values: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Text queries with their probabilities on visual keys zeroed.

    q: (b, H, t, d); k, v: (b, Hkv, n, d) (GQA handled by grouping queries, no kv copies).
    ``visual_spans``: [s, e) key-index ranges of the images' tokens. Which keys a query sees:
    ``visible`` (t, n) bool when given (the family's own mask: sliding windows, padding);
    otherwise causality by position, ``q_pos`` (t,) against ``k_pos`` (n,), and ``k_pos=None``
    means every key is visible to every query.
    Exact form (``renormalise=False``): the softmax normaliser still contains the visual keys;
    ``q.k`` is computed for visual keys, ``a.v`` only over the other keys (slices, no gathers).
    ``merge`` (layer 0): each image's removed mass goes onto its first key, whose value is
    ``merge_values[i]`` (b, Hkv, 1, d) when given (a sliding cache may no longer hold it).
    ``renormalise=True``: visual keys are dropped, softmax over the other keys only.
    Returns (b, H, t, d).
    """
    b, H, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = H // hkv
    qg = q.reshape(b, hkv, g * t, d).float()  # head h = kv_head * g + r, as repeat_kv orders them
    # (g*t, n) True where a key is NOT visible, rows ordered as qg's; built even when nothing is hidden
    # (masking nothing changes nothing) rather than asking the device, which would stall a GPU
    hidden = None
    if visible is not None:
        hidden = ~visible.repeat(g, 1)
    elif k_pos is not None:
        hidden = k_pos[None, :] > q_pos.repeat(g)[:, None]

    def scores(s, e):
        sc = torch.matmul(qg, k[:, :, s:e].float().transpose(-1, -2)) * scale
        if hidden is not None:
            sc = sc.masked_fill(hidden[:, s:e], NEG_INF)
        return sc

    text_runs = _complement_runs(visual_spans, n)
    s_text = [scores(s, e) for s, e in text_runs]
    lse_text = torch.logsumexp(torch.cat(s_text, dim=-1), dim=-1)
    if renormalise:
        lse_all = lse_text
        lse_img = []
    else:
        lse_img = [torch.logsumexp(scores(s, e), dim=-1) for s, e in visual_spans]
        lse_all = lse_text
        for l in lse_img:
            lse_all = torch.logaddexp(lse_all, l)
    out = torch.zeros(b, hkv, g * t, v.shape[-1], dtype=torch.float32, device=q.device)
    for (s, e), sc in zip(text_runs, s_text):
        out = out + torch.matmul(torch.exp(sc - lse_all[..., None]), v[:, :, s:e].float())
    if merge:
        firsts = merge_values if merge_values is not None else [v[:, :, s : s + 1] for s, _ in visual_spans]
        for first, l in zip(firsts, lse_img):
            out = out + torch.exp(l - lse_all).nan_to_num(0.0)[..., None] * first.float()
    return out.to(q.dtype).reshape(b, H, t, -1)


def shallow_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    visual: torch.Tensor,
    mode: str,
    onehot: torch.Tensor | None = None,
    firsts: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode queries (text) of a shallow-stage layer against the layer's cache, in a fixed handful of
    operators whatever the number of images (a decode step is launch-bound on a GPU).

    q: (b, H, t, d); k, v: (b, Hkv, K, d), GQA by grouping queries; ``visual`` (K,) bool marks visual keys;
    ``hidden`` (t, K) bool the keys a query does not see (None: all visible). ``mode``: 'disable' (visual
    probabilities zeroed, softmax over all keys), 'disable_renorm' (visual keys dropped before the
    softmax) or 'merge' (as 'disable', plus each span's probability mass times that span's first value:
    ``onehot`` (P, G) float says which of the first P keys belong to span g, ``firsts`` (b, Hkv, G, d) the
    values). The same sums as ``text_rows_attention``. Returns (b, H, t, d); with ``weights``, also the
    (b, H, t, K) float32 probabilities the queries used (eager's ``output_attentions``: visual keys zero,
    each span's mass on its first key of this cache for 'merge'), still without a device read.
    """
    b, H, t, d = q.shape
    hkv = k.shape[1]
    g = H // hkv

    def f32(x):
        return x if x.dtype == torch.float32 else x.float()

    scores = torch.matmul(f32(q).reshape(b, hkv, g * t, d), f32(k).transpose(-1, -2)) * scale
    if hidden is not None:
        scores = scores.masked_fill(hidden.repeat(g, 1), NEG_INF)
    if mode == "disable_renorm":
        scores = scores.masked_fill(visual, NEG_INF)
    p = torch.softmax(scores, dim=-1)
    used = p.masked_fill(visual, 0.0)
    out = torch.matmul(used, f32(v))
    if mode == "merge":
        mass = torch.matmul(p[..., : onehot.shape[0]], onehot)  # (b, Hkv, g*t, G): each span's probability
        out = out + torch.matmul(mass, firsts)
        if weights:  # the mass shown on each span's first entry in this cache
            first = onehot * (onehot.cumsum(0) == 1)
            used = torch.cat([used[..., : onehot.shape[0]] + torch.matmul(mass, first.T),
                              used[..., onehot.shape[0]:]], dim=-1)
    out = out.to(q.dtype).reshape(b, H, t, -1)
    return (out, used.reshape(b, H, t, -1)) if weights else out


def visual_rows_layer0(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    span: tuple[int, int],
    earlier_visual: torch.Tensor,
    earlier_nonvisual: torch.Tensor,
) -> torch.Tensor:
    """Layer-0 rows of the visual queries of one image span [s, e): visual keys zeroed, no merge.

    q: (b, H, e-s, d) the span's queries; k, v: (b, H, n, d). Keys before the span are split into
    ``earlier_visual`` and ``earlier_nonvisual`` index tensors; keys inside the span are causal.
    Returns (b, H, e-s, d) = sum over non-visual keys of softmax-over-all-keys probabilities times v.
    """
    s, e = span
    out_nv, lse_nv = attention_with_lse(q, k.index_select(2, earlier_nonvisual), v.index_select(2, earlier_nonvisual), scale, False)
    # lse over the span's own keys (causal) and earlier images' keys; the a.v part is not used.
    _, lse_own = attention_with_lse(q, k[:, :, s:e], v[:, :, s:e], scale, True)
    _, lse_ev = attention_with_lse(q, k.index_select(2, earlier_visual), v.index_select(2, earlier_visual), scale, False)
    lse_all = torch.logaddexp(torch.logaddexp(lse_nv.float(), lse_own.float()), lse_ev.float())
    w = torch.exp(lse_nv.float() - lse_all).nan_to_num(0.0)
    return out_nv * w.to(out_nv.dtype)[..., None]


def masked_rows_without_visual(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible: torch.Tensor,
    visual_keys: torch.Tensor, chunk: int = 256,
) -> torch.Tensor:
    """Rows whose probabilities on visual keys are zeroed without merge or renormalisation, under
    an arbitrary visibility mask (bidirectional image blocks, sliding windows).

    q: (b, H, r, d); k, v: (b, H, n, d); ``visible`` (r, n) bool; ``visual_keys`` (n,) bool.
    Computed in chunks of rows, so at most (chunk x n) scores exist at once. Returns (b, H, r, d).
    """
    outs = []
    kt, vf = k.float().transpose(-1, -2), v.float()  # once, not per chunk (a copy in half precision)
    for s in range(0, q.shape[2], chunk):
        sc = torch.matmul(q[:, :, s : s + chunk].float(), kt) * scale
        sc = sc.masked_fill(~visible[s : s + chunk], NEG_INF)
        p = torch.softmax(sc, dim=-1).masked_fill(visual_keys, 0.0)
        outs.append(torch.matmul(p, vf))
    return torch.cat(outs, dim=2).to(q.dtype)


@dataclass
class Influence:
    """What the last prompt token's attention row says about the visual tokens of one layer.

    All tensors have one entry per visual token present in the layer, in sequence order;
    ``visual_ids`` are their indices among the prompt's visual tokens.
    """

    layer: int
    visual_ids: torch.Tensor  # long
    cos: torch.Tensor  # cos(o - c_j, o)
    norm: torch.Tensor  # ||c_j||_2
    attention: torch.Tensor  # a[h, j] averaged over heads
    output_norm: float  # ||o||_2
    hidden: torch.Tensor | None = None  # the layer's input hidden states of those tokens
    # (text rows, visual tokens) head-mean attention of the text queries after the first image,
    # filled only for methods that ask for it (``PruningMethod.needs_text_attention``)
    text_attention: torch.Tensor | None = None

    @property
    def min_cos(self) -> float:
        return float(self.cos.min()) if self.cos.numel() else 1.0


def text_rows_to_visual(
    q_rows: torch.Tensor, k: torch.Tensor, scale: float, row_index: torch.Tensor, visual_keys: torch.Tensor,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean softmax attention of some query rows on the visual keys, (rows, m) float32.

    q_rows: (1, H, r, d) the rows' queries; k: (1, H, n, d) with H heads; ``row_index`` the rows'
    indices in the key sequence (causal: row i sees keys 0..i, unless ``visible`` (r, n) says which
    keys each row sees). Only (r x n) scores exist at once.
    """
    scores = torch.matmul(q_rows.float(), k.float().transpose(-1, -2))[0] * scale  # (H, r, n)
    if visible is None:
        visible = torch.arange(k.shape[2], device=k.device)[None, :] <= row_index[:, None]
    scores = scores.masked_fill(~visible[None], NEG_INF)
    return torch.softmax(scores, dim=-1)[:, :, visual_keys].mean(0)


def influence_sums(
    q_last: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visual_keys: torch.Tensor,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-head sums the last query's influence is made of, over the heads given, as one float64
    tensor of ``3m + 2`` values for ``m`` visual keys: ``[co (m), ||c||^2 (m), sum_h a[h,j] (m), ||o||^2,
    heads]`` (layout: ``SUMS_LAYOUT``). Every entry is a sum over query heads, so heads split among
    processes (tensor parallelism) give the whole model's sums by adding theirs (``influence_from_sums``
    turns them into the influence).

    q_last: (1, H, 1, d); k, v: (1, Hkv, n, d), all keys visible to the last query unless ``visible`` (n,)
    bool says which are (a sliding window); query head h reads kv head ``h // (H // Hkv)`` (GQA; no copies
    of K/V are made). With ``c_j = concat_h a[h,j] v[h,j]`` and ``o = sum_j c_j`` (before o_proj):
    ``co_j = c_j . o = sum_h a[h,j] (v[h,j] . o_h)``, ``||c_j||^2 = sum_h a[h,j]^2 ||v[h,j]||^2``,
    ``||o||^2 = sum_h ||o_h||^2``. Nothing of size (m, H*d) is formed.
    """
    H, d = q_last.shape[1], q_last.shape[-1]
    hkv = k.shape[1]
    g = H // hkv
    kf, vf = k[0].float(), v[0].float()  # (Hkv, n, d)
    scores = torch.matmul(q_last[0, :, 0].float().view(hkv, g, d), kf.transpose(-1, -2)) * scale  # (Hkv, g, n)
    if visible is not None:
        scores = scores.masked_fill(~visible, NEG_INF)
    a = torch.softmax(scores, dim=-1)
    o = torch.matmul(a, vf)  # (Hkv, g, d)
    vv = vf.index_select(1, visual_keys)  # (Hkv, m, d)
    av = a.index_select(2, visual_keys).double()  # (Hkv, g, m)
    vo = torch.matmul(o, vv.transpose(-1, -2)).double()  # (Hkv, g, m): v[h,j] . o_h
    vn = (vv * vv).sum(-1).double()[:, None, :]  # (Hkv, 1, m): ||v[h,j]||^2
    co = (av * vo).sum((0, 1))
    cn2 = (av * av * vn).sum((0, 1))
    attention = av.reshape(H, -1).sum(0)
    oo = (o.double() ** 2).sum()
    return torch.cat([co, cn2, attention, torch.stack([oo, oo.new_tensor(float(H))])])


SUMS_LAYOUT = "co (m), ||c_j||^2 (m), attention summed over heads (m), ||o||^2, heads"


def influence_from_sums(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos(o - c_j, o), ||c_j||, mean-over-heads attention a_j, ||o||) from ``influence_sums`` (those of
    every head: one process's, or several processes' added), in float64 until the end:
    ``cos = (|o|^2 - co_j) / (|o - c_j| |o|)`` with ``|o - c_j|^2 = |o|^2 - 2 co_j + ||c_j||^2``."""
    m = (sums.numel() - 2) // 3
    co, cn2, attention, (oo, heads) = sums[:m], sums[m : 2 * m], sums[2 * m : 3 * m], sums[3 * m :]
    dist = (oo - 2 * co + cn2).clamp_min(0).sqrt()
    cos = (oo - co) / (dist * oo.sqrt()).clamp_min(1e-12)
    return cos.float(), cn2.sqrt().float(), (attention / heads).float(), oo.sqrt().float()


def last_row_influence(
    q_last: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visual_keys: torch.Tensor,
    visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Influence of visual keys on the last query's attention output ``o`` (before o_proj), all heads
    present: ``influence_from_sums(influence_sums(...))``; see those two."""
    return influence_from_sums(influence_sums(q_last, k, v, scale, visual_keys, visible))


def shallow_stage_probabilities(
    q: torch.Tensor, k: torch.Tensor, scale: float, visible: torch.Tensor, mode: str,
    row_edited: torch.Tensor, row_text: torch.Tensor, key_span: torch.Tensor, span_keys: list[int],
) -> torch.Tensor:
    """The probabilities a shallow-stage layer attends with, as one (b, H, r, n) float32 matrix: what
    eager attention returns for ``output_attentions`` (the kernels above never form it).

    Softmax over the ``visible`` (r, n) keys; rows in ``row_edited`` (r,) bool lose their probabilities
    on visual keys (``key_span`` (n,): the key's span index, -1 for text); the text rows among them
    (``row_text``) then get each span's removed mass on that span's first key (``span_keys[g]``, mode
    ``merge``) or are renormalised (``disable_renorm``). q: (b, H, r, d), k: (b, Hkv, n, d).
    """
    kk = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = torch.matmul(q.float(), kk.float().transpose(-1, -2)) * scale
    p = torch.softmax(scores.masked_fill(~visible, NEG_INF), dim=-1)
    visual = key_span >= 0
    out = p.masked_fill(row_edited[:, None] & visual[None, :], 0.0)
    text = row_text[:, None]
    if mode == "merge" and span_keys:
        mass = torch.zeros(*p.shape[:-1], len(span_keys), dtype=p.dtype, device=p.device)
        mass.scatter_add_(-1, key_span.clamp(min=0).expand_as(p), p * visual)
        cols = torch.tensor(span_keys, device=p.device)
        out = out.index_add(-1, cols, mass * text)
    elif mode == "disable_renorm":
        out = torch.where(text, out / out.sum(-1, keepdim=True).clamp_min(1e-30), out)
    return out
