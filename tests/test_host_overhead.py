"""GPU readiness, measured on the CPU: a pruned decode step reads nothing back from the device and calls
about as many operators as the unpruned one; a pruned prefill reads values only where it decides.

Counts come from the profiler and a torch-function mode (``benchmarks/host_overhead.py``): they are
deterministic, so they are asserted; times are not (the benchmark reports them)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import host_overhead as H  # noqa: E402


@pytest.fixture(scope="module")
def counts():
    out = {}
    with torch.no_grad():
        for layers in (8, 16):
            model = H.narrow_llava(layers)
            inputs = H.random_prompt(model, seed=0, prefix=6, suffix=16)
            table = H.settings(layers)
            for name in ("unpruned", "visipruner (forced schedule)", "fastv"):
                out[layers, name] = H.measure(model, inputs, *table[name])
    return out


@pytest.mark.parametrize("name", ["visipruner (forced schedule)", "fastv"])
def test_decode_step_syncs_and_ops(counts, name):
    _, base, _ = counts[16, "unpruned"]
    _, step, _ = counts[16, name]
    assert step.syncs <= base.syncs, step.sync_ops
    assert step.ops <= 1.2 * base.ops, (step.ops, base.ops)


@pytest.mark.parametrize("name", ["visipruner (forced schedule)", "fastv"])
def test_prefill_syncs_come_from_decisions(counts, name):
    """Doubling the depth with the same decisions adds no reads: none is taken per layer."""
    pre8, _, decisions8 = counts[8, name]
    pre16, _, decisions16 = counts[16, name]
    assert decisions8 == decisions16 > 0
    assert pre16.syncs == pre8.syncs, (pre8.sync_ops, pre16.sync_ops)


def test_the_counter_sees_reads():
    """The counting itself: .item(), bool(), .tolist() and nonzero are each seen."""
    x = torch.arange(4)
    assert H.count(lambda: (x.sum().item(), bool(x.any()), x.tolist(), x.nonzero())).syncs == 4
    assert H.count(lambda: x + 1).syncs == 0
