"""One prompt's decisions and figures, shared by every engine binding (HF runtime, vLLM plugin).

An engine runs the layers; after each layer it hands this module the prompt's state (the HF
runtime's ``_PromptState``: which tokens are present, the method, per-layer records) and that
layer's post-RoPE ``q, k, v`` of the prompt's own tokens. ``decide_layer`` computes what the
method asks for (the last token's influence, text-row attention) with the kernels of
``attention.py`` and records the method's decision as the tokens to keep from the next layer on;
``prefill_stats`` turns the per-layer records into ``PruneStats`` (FLOPs by ``flops.py``). So both
engines take the same decisions from the same numbers and report the same figures.
"""

from __future__ import annotations

import torch

from . import flops as F_
from .attention import Influence, influence_from_sums, influence_sums, repeat_kv, text_rows_to_visual
from .methods.base import Decision


def decide_layer(st, layer: int, q, k, v, scale: float, groups: int, mode, visible, reduce=None) -> None:
    """The method's decision after ``layer`` for one prompt; ``q`` (1, H, n, d), ``k, v`` (1, Hkv, n, d)
    are that prompt's rows only, in sequence order; ``visible`` its (n, n) mask or None (causal).
    Taken on the prompt's last token over the prompt's keys: tokens the call carries after the prompt
    (``st.extra``: drafts being verified) take no part. Sets ``st.pending_keep`` / ``st.pending_merges``
    for the engine to apply before the next layer, and records them in ``st.decisions``.

    ``reduce``: where ``q`` holds only some of the model's heads (tensor parallelism: a process's share),
    a callable that returns the sum over every process of the influence's per-head sums
    (``attention.influence_sums``, one float64 tensor of 3m + 2 values) so that every process decides on
    the whole model's influence; None (HF runtime): the heads given are all of them."""
    if st.replay is not None:  # a recomputed prompt: the decisions its own prefill took, not new ones
        keep, merges = st.replay.get(layer, (None, []))
        st.pending_keep, st.pending_merges = keep, list(merges)
        if keep is not None or merges:  # kept as this state's own record too (it may be replayed again)
            st.decisions[layer] = (keep, list(merges))
        return
    method = st.method
    present = st.present
    influence = None
    if method.needs_influence(layer):
        if mode is not None:
            raise RuntimeError("influence at a shallow-stage layer is not defined (probabilities are modified)")
        if st.extra:  # the prompt's rows, keys and visibility only
            end = st.prompt_rows()
            q, k, v = q[:, :, :end], k[:, :, :end], v[:, :, :end]
            visible = None if visible is None else visible[:end, :end]
        vis_keys = (st.visual_ids >= 0).nonzero().squeeze(-1)
        sums = influence_sums(q[:, :, -1:], k, v, scale, vis_keys, None if visible is None else visible[-1])
        cos, norm, attn, onorm = influence_from_sums(sums if reduce is None else reduce(sums))
        hidden = st.layer_input[0].index_select(0, vis_keys)
        influence = Influence(layer, present, cos, norm, attn, float(onorm), hidden)
        st.layer_influence[layer] = (int(k.shape[2]), int(vis_keys.numel()))
        if method.needs_text_attention(layer) and vis_keys.numel():
            if reduce is not None:  # its rows' head-mean is not among the sums processes add
                raise RuntimeError("text-row attention is not defined over heads split among processes")
            first = int(vis_keys[0])
            ar = torch.arange(st.visual_ids.numel(), device=vis_keys.device)
            rows = (st.visual_ids < 0) & (ar > first) & (ar < q.shape[2])
            rows = rows.nonzero().squeeze(-1)
            influence.text_attention = text_rows_to_visual(
                q.index_select(2, rows), repeat_kv(k, groups), scale, rows, vis_keys,
                None if visible is None else visible.index_select(0, rows))
            st.layer_text_rows[layer] = int(rows.numel())
    keep = method.decide(layer, influence, present)
    if isinstance(keep, Decision):
        st.pending_merges = [(int(d), [int(x) for x in src]) for d, src in keep.merges if len(src)]
        keep = keep.keep
    if keep is not None:
        st.pending_keep = keep.to(st.visual_ids.device)
    if st.pending_keep is not None or st.pending_merges:
        st.decisions[layer] = (st.pending_keep, list(st.pending_merges))


def kept_rows(st) -> torch.Tensor:
    """Which of the current layer's tokens stay after the pending decision: text, the visual tokens the
    method keeps, and always the prompt's last token (the row generation reads: a prompt ending in visual
    tokens, or made of them only, is never left without it). Tokens after the prompt are text."""
    keep = (st.visual_ids < 0) | torch.isin(st.visual_ids, st.pending_keep)
    keep[st.prompt_rows() - 1] = True
    return keep


def prefill_stats(st, dims, vision_dims, num_layers: int):
    """``PruneStats`` of one prompt's prefill from its per-layer records (tokens and visual tokens each
    layer ran on, shallow modes, influence checks), FLOPs counted by ``flops.py``."""
    from .runtime import PruneStats

    n0 = st.layout.length + st.extra + st.dense_offset  # dense: the unreduced prompt
    stats = PruneStats(
        prompt_length=n0,
        num_visual_tokens=st.original_visual,
        num_images=sum(k == "image" for k in st.layout.span_kinds),
        num_frames=sum(k == "video" for k in st.layout.span_kinds),
        pruning_applied=True,
    )
    for layer in range(num_layers):
        pos, vis = st.layer_positions[layer], st.layer_visual_ids[layer]
        n, n_vis = int(pos.numel()), st.layer_visual_counts[layer]  # host-side counts: no device reads
        stats.tokens_per_layer.append(n)
        stats.layer_positions.append(pos)
        stats.visual_tokens_per_layer.append(n_vis)
        mode = st.layer_modes[layer]
        if mode is None:
            score = weighted = F_.causal_pairs(n)
        else:
            if n != st.layout.length + st.extra:  # (extra: a cacheless step's generated tokens)
                visual_list = (vis >= 0).tolist()
            else:  # shallow layers run the unpruned prompt: one read per prompt
                if st.visual_list is None:
                    st.visual_list = (vis >= 0).tolist()
                visual_list = st.visual_list
            score, weighted = F_.shallow_prefill_pairs(visual_list, mode, st.layout.image_spans)
        extra = F_.influence_flops(dims, *st.layer_influence[layer]) if st.layer_influence[layer] else 0
        if st.layer_text_rows[layer]:
            extra += F_.text_rows_flops(dims, st.layer_text_rows[layer], st.layer_influence[layer][0])
        stats.prefill_flops += F_.layer_flops(dims, n, score, weighted, extra)
        stats.dense_prefill_flops += F_.layer_flops(dims, n0, F_.causal_pairs(n0), F_.causal_pairs(n0))
        stats.prefill_flops_fastv += F_.fastv_layer_flops(dims, n)
        stats.dense_prefill_flops_fastv += F_.fastv_layer_flops(dims, n0)
    if vision_dims is not None:
        images = st.original_visual // vision_dims.tokens_per_image
        stats.vision_flops = F_.vision_flops(vision_dims, images, st.layout.num_visual)  # what was projected
        stats.dense_vision_flops = F_.vision_flops(vision_dims, images, st.original_visual)
    summary = st.method.summary()
    stats.fusion_layer = summary.pop("fusion_layer", None)
    stats.exit_layer = summary.pop("exit_layer", None)
    stats.critical_tokens = summary.pop("critical_tokens", [])
    stats.method = summary
    return stats
