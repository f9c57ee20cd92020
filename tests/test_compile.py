"""torch.compile with pruning: a compiled model gives exactly the eager pruned result, prefill and decode.

The backend is ``eager``: what went silently wrong was dynamo's tracing (a WeakKeyDictionary lookup traced
as layer 0's module for every layer; hooks inlined into graphs; guards on the runtime's Python state),
which happens before any backend sees a graph, and is the same for every backend. ``eager`` runs the
traced graphs as traced, so these tests check the tracing and guards without paying for code generation
(``benchmarks/compile_speed.py`` runs inductor).
"""

import os
import sys

import pytest
import torch
from transformers import DynamicCache

import visipruner
from visipruner.methods import FastVConfig
from visipruner.testing import random_prompt, tiny_llava

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import host_overhead as H  # noqa: E402

# every method on a 4-layer LLaVA with 16 visual tokens (VisiPruner: forced schedule, every stage)
PEERS = {name: row for name, row in H.settings(4, visual=16).items() if name != "unpruned"}


def _greedy(model, inputs, steps=2):
    """Prefill then ``steps`` decode steps into a DynamicCache: (tokens, every step's last logits)."""
    cache = DynamicCache(config=model.config.text_config)
    logits = [model(**inputs, past_key_values=cache, use_cache=True).logits[:, -1]]
    tokens = [logits[-1].argmax(-1, keepdim=True)]
    for _ in range(steps):
        logits.append(model(input_ids=tokens[-1], past_key_values=cache, use_cache=True).logits[:, -1])
        tokens.append(logits[-1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1), torch.stack(logits)


@torch.no_grad()
def test_compiled_equals_eager_for_every_method():
    """One compiled model, methods applied and removed in turn (so also: apply after compile, remove after
    compile): each compiled run equals the eager pruned run, tokens, logits and stats."""
    from torch._dynamo.utils import counters

    model = tiny_llava(0, layers=4)
    inputs = random_prompt(model, seed=0)
    dense_tokens, dense_logits = _greedy(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=64):  # a fallback to eager would make this test vacuous
        graphs = counters["stats"]["unique_graphs"]
        tokens, logits = _greedy(compiled, inputs)
        assert counters["stats"]["unique_graphs"] > graphs  # it did compile
        assert torch.equal(tokens, dense_tokens) and torch.allclose(logits, dense_logits, atol=1e-5)
        for name in PEERS:
            handle = H.apply(model, *PEERS[name])
            eager_tokens, eager_logits = _greedy(model, inputs)
            eager_stats = handle.last_stats
            assert eager_stats.tokens_per_layer[-1] < eager_stats.prompt_length, name  # it prunes
            tokens, logits = _greedy(compiled, inputs)
            assert torch.equal(tokens, eager_tokens), name
            assert torch.allclose(logits, eager_logits, atol=1e-5), (name, (logits - eager_logits).abs().max())
            assert handle.last_stats.tokens_per_layer == eager_stats.tokens_per_layer, name
            assert handle.last_stats.decode_flops == eager_stats.decode_flops, name
            handle.remove()
        tokens, logits = _greedy(compiled, inputs)  # removed after compile: the unpruned model again
        assert torch.equal(tokens, dense_tokens) and torch.allclose(logits, dense_logits, atol=1e-5)


@torch.no_grad()
def test_fullgraph_names_the_cause():
    """Decisions are data-dependent: fullgraph=True cannot hold them; the error says so at the first call."""
    model = tiny_llava(0, layers=2)
    inputs = random_prompt(model, seed=0)
    torch._dynamo.reset()
    with visipruner.apply(model, FastVConfig(layer=1)):
        with pytest.raises(Exception, match="visipruner takes its pruning decisions eagerly.*without fullgraph=True"):
            torch.compile(model, backend="eager", fullgraph=True)(**inputs)
