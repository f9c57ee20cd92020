"""Per-request pruning inside one vLLM forward step: the binding of the shared decisions to vLLM.

vLLM runs a step as one flat sequence of every scheduled request's tokens. ``StepPruner.forward``
runs the language model's decoder layers itself (vLLM's own layer modules, unchanged):

* a request whose prompt with visual tokens is prefilled in this step gets its own method object
  and prompt state (``runtime._PromptState``, the HF runtime's bookkeeping); after each layer
  ``decisions.decide_layer`` takes that request's decision from its own rows of the layer's
  post-RoPE q/k/v (captured by a forward pre-hook on the layer's attention module), exactly as the
  HF runtime does for a prompt alone. Dropped tokens leave the hidden states, residual and
  positions before the next layer; kept tokens keep their original positions.
* each layer whose token set differs from the step's gets its own attention metadata, built by the
  attention backend's own metadata builder from a modified ``CommonAttentionMetadata``: fewer
  query tokens for the pruned requests, and a pruned request's kept tokens written to the front
  of its own slots (the block table of the layer's own KV-cache group), so that layer's KV cache
  holds only them. Layers after an exit bound have a group whose blocks hold text only
  (``kv_memory.py``).
* in decode, a pruned request's new token goes to slot ``position - dropped`` of each layer and
  attends with ``seq_len - dropped`` keys: only the kept tokens and the generated ones. Its
  position (RoPE) is the unpruned one, as the method requires.

Under tensor parallelism every rank runs this on the same step inputs with its share of the heads; the
influence's per-head sums are all-reduced (``_tensor_parallel_sum``), so every rank takes the same
decisions and keeps the same per-request bookkeeping.

Requests are told apart across steps by the first block of their block table (a block belongs to
one running request: prefix caching is refused); every prefill re-registers its first block, so a
finished request's state is never read by the next owner of that block. Requests without visual
tokens, and steps without pruned requests, run vLLM's own forward untouched.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import torch

from ..decisions import decide_layer, kept_rows, prefill_stats
from ..methods.base import PromptLayout
from ..runtime import _PromptState  # the HF runtime's per-prompt bookkeeping, shared


@dataclasses.dataclass
class _Request:
    """A pruned request across steps: its prompt state and, per layer, how many prompt tokens left."""

    state: _PromptState
    dropped: list[int]  # per layer: prompt tokens that layer's KV cache does not hold
    prompt: torch.Tensor  # the prompt's token ids
    fed: list[int] = dataclasses.field(default_factory=list)  # generated tokens fed back in decode steps
    resumed: bool = False  # a recomputation after preemption: decisions replayed, no new record


@dataclasses.dataclass
class _Row:
    """One request of the current step, as the current layer sees it."""

    index: int  # request index in the step's metadata
    start: int  # first token in the step's flat input
    length: int  # tokens scheduled in the step
    context: int  # tokens already in the KV cache before this step
    prefill: _Request | None = None  # a pruned prompt prefilled in this step
    decode: _Request | None = None  # a pruned request decoding in this step
    rows: torch.Tensor | None = None  # for a prefill: the step's token indices present in the layer


# what the binding reads from vLLM's per-layer attention metadata (it builds new metadata only through the
# backend's own builder, from a CommonAttentionMetadata): fields of the CPU, FlashAttention, Triton and
# FlexAttention backends' metadata (FlashInfer's has none of them)
_READ = ("query_start_loc", "seq_lens", "block_table")


def spans_of(is_visual: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of visual tokens (an image, for LLaVA)."""
    out, at = [], 0
    for v, run in itertools.groupby(is_visual):
        n = len(list(run))
        if v:
            out.append((at, at + n))
        at += n
    return out


class StepPruner:
    """Prunes one vLLM language model (``lm``: vLLM's LlamaModel/Qwen2Model) per request."""

    def __init__(self, settings, lm, visual_token_ids, vllm_config, dims, on_prefill=None):
        self.settings = settings
        self.lm = lm
        self.layers = list(lm.layers[lm.start_layer:lm.end_layer])
        self.attn = [layer.self_attn.attn for layer in self.layers]
        self.names = [a.layer_name for a in self.attn]
        self.visual_token_ids = torch.tensor(sorted(visual_token_ids))
        self.vllm_config = vllm_config
        self.dims = dims
        self.on_prefill = on_prefill  # called with (PruneStats, prompt token ids) after a pruned prefill
        self.requests: dict[int, _Request] = {}  # first block id -> request
        self._parked: dict[int, _Request] = {}  # requests whose first block went to another (preempted or done)
        self.resumed = 0  # recomputations of preempted requests that replayed their decisions
        self._specs = {}  # layer -> its KV-cache spec (fixed at engine start; asked once)
        self._builders = {}  # KV-cache spec -> the attention backend's metadata builder
        self._built = {}
        self._captured = None  # (q, k, v) of the layer being run, when a decision needs them
        self._capture = False
        self.reductions, self.reduce_seconds = 0, 0.0  # tensor parallelism: influence sums all-reduced
        self._reduce = self._tensor_parallel_sum()
        for a in self.attn:
            a.register_forward_pre_hook(self._capture_hook)

    def _tensor_parallel_sum(self):
        """Under tensor parallelism each process holds num_heads / TP query heads (the captured q/k/v are
        its heads), and the influence is made of sums over heads (``attention.influence_sums``): one
        all-reduce of those 3m + 2 float64 values over vLLM's own TP group gives every process the whole
        model's influence, so all of them take the same decision. None without tensor parallelism.
        torch.distributed's all-reduce on the group's device group (gloo on CPU, NCCL on GPUs), not
        ``tensor_model_parallel_all_reduce``: vLLM's CPU shared-memory all-reduce has no float64 kernel."""
        import torch.distributed as dist
        from vllm.distributed import get_tp_group

        group = get_tp_group()
        if group.world_size == 1:
            return None

        def reduce(sums):
            start = time.perf_counter()
            dist.all_reduce(sums, group=group.device_group)
            self.reductions += 1
            self.reduce_seconds += time.perf_counter() - start
            return sums

        return reduce

    def _capture_hook(self, module, args):
        if self._capture:
            self._captured = args[:3]

    # ----------------------------------------------------------------------------- the step
    def forward(self, input_ids, positions, inputs_embeds, deepstack=None):
        """``deepstack``: Qwen3-VL's per-token features (one (tokens, hidden) tensor per layer, zero rows for
        text) that vLLM adds after the first layers; here added to the tokens each of those layers ran on."""
        from vllm.forward_context import get_forward_context

        fc = get_forward_context()
        md = fc.attn_metadata.get(self.names[0]) if isinstance(fc.attn_metadata, dict) else None
        if md is None or input_ids is None or inputs_embeds is None:
            return None  # profiling / dummy runs: vLLM's own forward
        missing = [f for f in _READ if not hasattr(md, f)]
        if missing:
            raise RuntimeError(
                f"visipruner: the attention backend's metadata ({type(md).__name__}) has no {', '.join(missing)}, "
                "which the plugin reads each request's tokens and KV blocks from; serve with a backend whose metadata "
                "has them (CPU_ATTN, FLASH_ATTN, TRITON_ATTN, FLEX_ATTENTION: --attention-backend)")
        steps = self._plan(input_ids, md)
        if steps is None:
            return None
        return self._run(fc, md, steps, input_ids, positions, inputs_embeds, deepstack)

    def _plan(self, input_ids, md) -> list[_Row] | None:
        """The step's requests; None when none is pruned (vLLM's own forward then runs)."""
        n = len(md.seq_lens)
        qsl = md.query_start_loc[: n + 1].tolist()
        seq = md.seq_lens[:n].tolist()
        first_block = md.block_table[:n, 0].tolist()
        rows, pruned = [], False
        for r in range(n):
            row = _Row(r, qsl[r], qsl[r + 1] - qsl[r], seq[r] - (qsl[r + 1] - qsl[r]))
            if row.context == 0:  # a new request's prompt, whole (chunked prefill is refused)
                self._park(self.requests.pop(first_block[r], None))
                ids = input_ids[row.start : row.start + row.length]
                is_vis = torch.isin(ids, self.visual_token_ids.to(ids.device))
                earlier = self._preempted(ids)
                if earlier is not None or bool(is_vis.any()):
                    row.prefill = self._start(ids, is_vis) if earlier is None else self._resume(earlier, ids)
                    self.requests[first_block[r]] = row.prefill
                    row.rows = torch.arange(row.start, row.start + row.length, device=ids.device)
                    pruned = True
            else:
                req = self.requests.get(first_block[r])
                if req is not None:
                    if row.length != 1:
                        raise RuntimeError(
                            f"visipruner: a pruned request got {row.length} tokens in one decode step (chunked "
                            "prefill or speculative decoding); these are refused at engine start")
                    row.decode = req
                    req.fed.append(int(input_ids[row.start]))
                    pruned = pruned or any(req.dropped)
            rows.append(row)
        return rows if pruned else None

    def _start(self, ids, is_vis, method=None) -> _Request:
        method = method or self.settings.build()
        vis = is_vis.tolist()
        spans = spans_of(vis)
        layout = PromptLayout(length=len(vis), visual_positions=is_vis.nonzero().squeeze(-1),
                              image_spans=spans, span_kinds=["image"] * len(spans))
        method.start(layout, len(self.layers))
        st = _PromptState(layout, len(self.layers), ids.device, method)
        st.prompt_ids = ids  # for the per-request record
        return _Request(st, [0] * len(self.layers), ids.clone())

    def _park(self, req: _Request | None) -> None:
        if req is not None:
            self._parked[id(req)] = req
            while len(self._parked) > 1024:
                self._parked.pop(next(iter(self._parked)))

    def _preempted(self, ids) -> _Request | None:
        """The earlier request this prefill recomputes, if any: vLLM recomputes a preempted request as a
        new prefill of its prompt, the tokens it fed back, and its last sampled token."""
        n = int(ids.numel())
        for req in [*self.requests.values(), *self._parked.values()]:
            p = int(req.prompt.numel())
            if n == p + len(req.fed) + 1 and req.state.prefilled and torch.equal(ids[:p], req.prompt) \
                    and ids[p : n - 1].tolist() == req.fed:
                self._parked.pop(id(req), None)
                for k in [k for k, v in self.requests.items() if v is req]:
                    del self.requests[k]
                return req
        return None

    def _resume(self, earlier: _Request, ids) -> _Request:
        """A recomputed request takes the decisions it took before (its prompt's visual tokens only)."""
        p = int(earlier.prompt.numel())
        is_vis = torch.isin(ids, self.visual_token_ids.to(ids.device)) & (torch.arange(ids.numel(), device=ids.device) < p)
        req = self._start(ids, is_vis, method=earlier.state.method)
        req.state.replay = earlier.state.decisions  # decide_layer replays them, layer by layer
        req.prompt, req.fed, req.resumed = earlier.prompt, earlier.fed, True
        self.resumed += 1
        return req

    def _run(self, fc, md, steps, input_ids, positions, inputs_embeds, deepstack=None):
        lm, T = self.lm, inputs_embeds.shape[0]
        self._device = inputs_embeds.device
        hidden, residual = inputs_embeds, None
        present = torch.arange(T, device=inputs_embeds.device)  # the step's token indices in the layer
        saved = {}
        self._built = {}  # this step's per-layer metadata, by dropped counts
        try:
            for L, layer in enumerate(self.layers):
                present, hidden, residual = self._apply_pending(L, steps, present, hidden, residual)
                self._install_metadata(fc, md, L, steps, present, saved)
                need = [s for s in steps if s.prefill is not None and s.prefill.state.replay is None
                        and s.prefill.state.method.needs_influence(L)]
                for s in steps:
                    if s.prefill is not None:
                        st = s.prefill.state
                        st.layer_positions[L], st.layer_visual_ids[L] = st.positions, st.visual_ids
                        st.layer_visual_counts[L] = st.present.numel()
                if need:  # the influence reads the layer's input hidden states of the visual tokens
                    full = hidden if residual is None else hidden + residual
                    for s in need:
                        s.prefill.state.layer_input = full.index_select(0, torch.searchsorted(present, s.rows))[None]
                self._capture = bool(need)
                hidden, residual = layer(positions.index_select(-1, present), hidden, residual)
                self._capture = False
                if deepstack is not None and L < len(deepstack):  # as the HF runtime: the tokens layer L ran on
                    hidden = hidden + deepstack[L].index_select(0, present)
                self._decide(L, steps, present)
        finally:
            for name, (m, slots) in saved.items():
                fc.attn_metadata[name] = m
                fc.slot_mapping[name] = slots
            self._captured = None
            self._built = {}
        hidden, _ = lm.norm(hidden, residual)
        out = hidden.new_zeros(T, hidden.shape[-1])  # dropped tokens' rows: never sampled
        out[present] = hidden
        for s in steps:
            if s.prefill is not None:
                self._finish(s.prefill)
        return out

    def _apply_pending(self, L, steps, present, hidden, residual):
        """Drops what the requests' decisions after layer L-1 removed, from every per-token tensor."""
        changed = False
        for s in steps:
            st = s.prefill.state if s.prefill is not None else None
            if st is None or st.pending_keep is None:
                continue
            local = kept_rows(st).nonzero().squeeze(-1)
            st.keep_rows(local)
            st.pending_keep = None
            changed = changed or local.numel() != s.rows.numel()
            s.rows = s.rows[local]
        if changed:  # requests stay in order, each one's present tokens contiguous; padding at the end
            dev = present.device
            end = steps[-1].start + steps[-1].length
            new = torch.cat([s.rows if s.prefill is not None else torch.arange(s.start, s.start + s.length, device=dev)
                             for s in steps] + [present[present >= end]])
            local = torch.searchsorted(present, new)
            present = new
            hidden = hidden.index_select(0, local)
            residual = None if residual is None else residual.index_select(0, local)
        for s in steps:
            if s.prefill is not None:
                s.prefill.dropped[L] = s.length - int(s.rows.numel())
                self._check_bound(L, s)
        return present, hidden, residual

    def _check_bound(self, L, s) -> None:
        """A layer with a bounded KV-cache spec (``kv_memory.py``) got blocks for the request's text and at
        most the bound's visual tokens: more kept tokens would overwrite another request's blocks."""
        allowance = getattr(self._spec(L), "allowance", None)
        if allowance is None:
            return
        req = s.prefill
        vis = req.state.layout.visual_positions
        every = int(vis.numel())
        dropped = every - int(bool((vis == req.prompt.numel() - 1).any()))  # a prompt's last token stays
        if s.length - req.dropped[L] > s.length - dropped + allowance(every):
            raise RuntimeError(
                f"visipruner: layer {L} keeps {s.length - req.dropped[L]} tokens of a request whose KV blocks there "
                f"hold {s.length - dropped + allowance(every)} (exit_by / the fusion budget); the decisions broke "
                "the bound the KV cache was planned on")

    def _decide(self, L, steps, present):
        q = k = v = None
        if self._captured is not None:
            q, k, v = self._captured
            self._captured = None
        attn = self.attn[L]
        for s in steps:
            if s.prefill is None:
                continue
            st = s.prefill.state
            qr = kr = vr = None
            if q is not None and st.replay is None and st.method.needs_influence(L):
                a = int(torch.searchsorted(present, s.rows[0]))  # a request's present tokens are contiguous
                b = a + int(s.rows.numel())
                qr = q[a:b].reshape(b - a, attn.num_heads, -1).transpose(0, 1)[None]
                kr = k[a:b].reshape(b - a, attn.num_kv_heads, -1).transpose(0, 1)[None]
                vr = v[a:b].reshape(b - a, attn.num_kv_heads, -1).transpose(0, 1)[None]
            decide_layer(st, L, qr, kr, vr, attn.impl.scale, attn.num_heads // attn.num_kv_heads, None, None,
                         self._reduce)
            st.layer_modes[L] = None

    def _finish(self, req: _Request):
        st = req.state
        st.layer_input = None
        st.prefilled = True
        if self.on_prefill is not None and not req.resumed:
            self.on_prefill(prefill_stats(st, self.dims, None, len(self.layers)), st.prompt_ids)
        st.prompt_ids = None

    # ------------------------------------------------------------------------- attention metadata
    def _install_metadata(self, fc, md, L, steps, present, saved):
        """Layer L's attention metadata when its tokens or KV layout differ from the step's; layers with
        the same dropped counts per request share one (built once per step)."""
        dropped = tuple((s.prefill or s.decode).dropped[L] if (s.prefill or s.decode) else 0 for s in steps)
        if not any(dropped):
            return
        name = self.names[L]
        saved.setdefault(name, (fc.attn_metadata[name], fc.slot_mapping[name]))
        key = (id(saved[name][1]), dropped)  # vLLM's slot mapping is per KV-cache group: one build per group
        if key not in self._built:
            self._built[key] = self._layer_metadata(*saved[name], L, steps, present)
        fc.attn_metadata[name], fc.slot_mapping[name] = self._built[key]

    def _layer_metadata(self, md, slot_mapping, L, steps, present):
        """From vLLM's metadata and slot mapping of layer L's own KV-cache group (its block table: the
        text-only layers after an exit bound have their own, see kv_memory.py)."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        dev = present.device
        bs = self.vllm_config.cache_config.block_size
        table = md.block_table
        counts, seq_lens = [], []
        slots = slot_mapping.index_select(0, present).clone()
        at = 0
        for s in steps:
            if s.prefill is not None:
                n = int(s.rows.numel())
                j = torch.arange(n, device=dev)  # kept tokens to the front of the request's own slots
                slots[at : at + n] = table[s.index, j // bs].to(slots.dtype) * bs + j % bs
                seq_lens.append(n)
            elif s.decode is not None:
                n = 1
                logical = s.context - s.decode.dropped[L]  # this layer's cache holds the kept tokens only
                slots[at] = int(table[s.index, logical // bs]) * bs + logical % bs
                seq_lens.append(logical + 1)
            else:
                n = s.length
                seq_lens.append(s.context + s.length)
            counts.append(n)
            at += n
        qsl = torch.zeros(len(counts) + 1, dtype=md.query_start_loc.dtype)
        qsl[1:] = torch.tensor(counts).cumsum(0)
        seq = torch.tensor(seq_lens, dtype=md.seq_lens.dtype)
        common = CommonAttentionMetadata(
            query_start_loc=qsl.to(dev), query_start_loc_cpu=qsl, seq_lens=seq.to(dev), num_reqs=len(counts),
            num_actual_tokens=at, max_query_len=max(counts), max_seq_len=max(seq_lens),
            block_table_tensor=table[: len(counts)], slot_mapping=slots[:at], causal=True,
            seq_lens_cpu_upper_bound=seq,
        )
        return self._metadata_builder(L).build(0, common), slots

    def _spec(self, L):
        """Layer L's KV-cache spec (a bounded one after an exit bound, ``kv_memory.py``)."""
        if L not in self._specs:
            self._specs[L] = self.attn[L].get_kv_cache_spec(self.vllm_config)
        return self._specs[L]

    def _metadata_builder(self, L):
        """The attention backend's own metadata builder for layer L's KV-cache spec (one per group kind)."""
        spec = self._spec(L)
        if spec not in self._builders:
            names = [n for i, n in enumerate(self.names) if self._spec(i) == spec]
            self._builders[spec] = self.attn[L].attn_backend.get_builder_cls()(spec, names, self.vllm_config,
                                                                                self._device)
        return self._builders[spec]

