"""The vLLM plugin (visipruner/vllm) on vLLM's CPU backend, against stock vLLM and the HF runtime.

A tiny random LLaVA (head dimension 32, 64 visual tokens per image) is saved as a model folder with
each method's config; each engine runs in this process (eager, no prefix caching, no chunked
prefill: the settings the plugin requires). Per request the plugin must take the same decisions and
give the same tokens and log-probs as ``visipruner.apply`` on the same HF weights and prompt, alone
or among other requests (continuous batching), and serve a folder without a config like stock vLLM.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import visipruner

try:
    import vllm  # noqa: F401
except ImportError as e:  # CI installs it (scripts/setup.sh --vllm): there a missing vLLM fails
    if os.environ.get("CI") == "true":
        raise ImportError(f"CI runs the vLLM tests: install vLLM with scripts/setup.sh --vllm ({e})") from e
    pytest.skip("vLLM is not installed (bash scripts/setup.sh --vllm)", allow_module_level=True)

from visipruner import (  # noqa: E402
    CDPrunerConfig, FastVConfig, PDropConfig, RandomConfig, Schedule, VisiPrunerConfig, VTWConfig)
from visipruner.testing import tiny_llava_with_processor  # noqa: E402
from visipruner.vllm.folders import save_for_vllm  # noqa: E402
from visipruner.vllm.records import RECENT, fingerprint  # noqa: E402

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # vLLM's own switch: the engine in this process

LAYERS, IMAGE = 6, 64  # 6 decoder layers; (64 / 8)^2 = 64 visual tokens per image
ENGINE = dict(dtype="float32", enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False,
              max_model_len=512, max_num_batched_tokens=2048, seed=0, gpu_memory_utilization=0.1,
              kv_cache_memory_bytes=2**27, limit_mm_per_prompt={"image": 2})
QUESTIONS = ["what color is the shape ?", "how many red circle there ?", "is there a blue square ?",
             "what shape is in the image ?", "a green triangle ?", "how many ?",
             "what color is the circle in image a ?", "yes or no ?", "is the shape red , blue or green ?",
             "how many square there , 0 1 2 3 or 4 ?"]
# (images, max_tokens) per request: images and text only, different lengths and answer lengths
SHAPES = [(1, 6), (0, 4), (2, 8), (1, 3), (1, 9), (0, 7), (2, 5), (1, 10), (1, 4), (0, 6)]


def _image(seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(IMAGE, IMAGE, 3) * 255).astype("uint8"))


class Request:
    def __init__(self, i: int):
        n_images, self.max_tokens = SHAPES[i]
        self.images = [_image(10 * i + j) for j in range(n_images)]
        self.prompt = ("<|im_start|>user\n" + "<image>\n" * n_images + QUESTIONS[i]
                       + "<|im_end|>\n<|im_start|>assistant\n")

    def vllm_prompt(self) -> dict:
        return {"prompt": self.prompt, **({"multi_modal_data": {"image": self.images}} if self.images else {})}


REQUESTS = [Request(i) for i in range(len(SHAPES))]


def tiny_model(lm: str = "llama"):
    """The HF model and processor (``lm``: 'llama' or 'qwen2'); the language model re-drawn with larger
    weights, so that greedy answers vary from token to token (the default init answers one token over
    and over)."""
    model, proc = tiny_llava_with_processor(0, layers=LAYERS, hidden=128, image_size=IMAGE, lm=lm)
    _redraw_language_model(model.model.language_model, model.lm_head)
    return model, proc


def _redraw_language_model(lm, lm_head):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 0.15))
        lm_head.weight.copy_(torch.randn(lm_head.weight.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    """``folder(name, config=None, schedule=None, record=None)``: the tiny model saved for vLLM."""
    model, proc = tiny

    def make(name, **kwargs):
        return save_for_vllm(model, proc, tmp_path_factory.mktemp(name), **kwargs)

    return make


def _engine(path, **overrides):
    from vllm import LLM

    return LLM(model=str(path), **{**ENGINE, **overrides})


def _params(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)


def _answer(out) -> tuple[list[int], list[float]]:
    c = out.outputs[0]
    return list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]


def _vllm_alone(llm, requests) -> list:
    return [llm.generate([r.vllm_prompt()], _params(r.max_tokens), use_tqdm=False)[0] for r in requests]


def _vllm_staggered(llm, requests) -> list:
    """All requests through vLLM's scheduler at once, the second half submitted while the first decodes."""
    eng = llm.llm_engine
    half = len(requests) // 2
    for i, r in enumerate(requests[:half]):
        eng.add_request(str(i), r.vllm_prompt(), _params(r.max_tokens))
    done, steps = {}, 0
    while eng.has_unfinished_requests() or steps <= 2:
        if steps == 2:  # the first half is decoding by now
            for i, r in enumerate(requests[half:], half):
                eng.add_request(str(i), r.vllm_prompt(), _params(r.max_tokens))
        for out in eng.step():
            if out.finished:
                done[int(out.request_id)] = out
        steps += 1
    return [done[i] for i in range(len(requests))]


def _hf(tiny, request, config=None, schedule=None):
    """(tokens, log-probs, PruneStats or None, prompt ids) of greedy decoding with ``visipruner.apply``."""
    model, proc = tiny
    videos = {"videos": request.videos} if getattr(request, "videos", None) else {}  # (test_vllm_families.py)
    inputs = proc(text=request.prompt, images=request.images or None, return_tensors="pt", **videos)
    gen = copy.deepcopy(model.generation_config)
    gen.eos_token_id = []  # as vLLM's ignore_eos: answers of exactly max_tokens
    handle = visipruner.apply(model, config, schedule=schedule) if config is not None else None
    try:
        with torch.no_grad():
            g = model.generate(**inputs, generation_config=gen, max_new_tokens=request.max_tokens, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
        stats = handle.last_stats if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
    prompt = inputs["input_ids"][0].tolist()
    tokens = g.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(g.logits, tokens)]
    return tokens, logprobs, stats, prompt


def _record(prompt_ids) -> dict:
    fp = fingerprint(prompt_ids)
    found = [r for r in RECENT if r["prompt_fingerprint"] == fp]
    assert found, "no pruning record for this prompt"
    return found[-1]


def _check_against_hf(tiny, outputs, config, schedule=None, tol=1e-4, requests=REQUESTS) -> list[dict]:
    """Each vLLM output equals the HF runtime's run of that request alone; returns the records."""
    records = []
    for r, out in zip(requests, outputs):
        tokens, logprobs, stats, prompt = _hf(tiny, r, config, schedule)
        assert list(out.prompt_token_ids) == prompt
        v_tokens, v_logprobs = _answer(out)
        assert v_tokens == tokens, r.prompt
        assert max(abs(a - b) for a, b in zip(v_logprobs, logprobs)) < tol
        if r.images:  # the same decisions, read from the plugin's per-request record
            rec = _record(prompt)
            assert rec["visual_tokens_per_layer"] == stats.visual_tokens_per_layer
            assert (rec["fusion_layer"], rec["exit_layer"]) == (stats.fusion_layer, stats.exit_layer)
            assert rec["critical_token_ids"] == stats.critical_tokens
            assert rec["prefill_flops_ratio"] == pytest.approx(stats.prefill_flops_ratio, abs=1e-6)
            records.append(rec)
    return records


# ------------------------------------------------------------------------------------ tests
STOCK = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, {tests!r})
import test_vllm as t
from vllm import LLM, ModelRegistry
from vllm.plugins import load_general_plugins
load_general_plugins()  # VLLM_PLUGINS keeps the plugin out: vLLM's own LLaVA class
assert "visipruner" not in repr(vars(ModelRegistry.models["LlavaForConditionalGeneration"]))
llm = LLM(model={path!r}, **t.ENGINE)
outs = llm.generate([r.vllm_prompt() for r in t.REQUESTS], [t._params(r.max_tokens) for r in t.REQUESTS])
json.dump([t._answer(o) for o in outs], open({out!r}, "w"))
"""


def test_unpruned_matches_stock_vllm(folder, tmp_path):
    """A folder without a pruning config, and a config that keeps every token (the plugin's own layer
    loop and metadata run), give stock vLLM's tokens and log-probs (stock: vLLM without the plugin)."""
    plain = folder("plain")
    out = tmp_path / "stock.json"
    env = dict(os.environ, VLLM_PLUGINS="no-such-plugin")  # vLLM's own plugin allow-list: none loads
    code = STOCK.format(tests=os.path.dirname(__file__), path=str(plain), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # runs while this process runs the plugin
    ours = []
    for path in (plain, folder("keep_all", config=FastVConfig(layer=1, keep_ratio=1.0))):
        llm = _engine(path)
        ours.append(llm.generate([r.vllm_prompt() for r in REQUESTS], [_params(r.max_tokens) for r in REQUESTS]))
        del llm
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stock = json.loads(out.read_text())
    for outs in ours:
        for (tokens, logprobs), o in zip(stock, outs):
            v_tokens, v_logprobs = _answer(o)
            assert v_tokens == tokens
            assert max(abs(a - b) for a, b in zip(v_logprobs, logprobs)) < 1e-5


def test_fastv_per_request_equals_hf_alone_and_batched(tiny, folder, tmp_path):
    """FastV: every request, alone and among the others (some submitted while others decode), takes the
    HF runtime's decisions and gives its tokens and log-probs; each pruned request leaves a record (the
    folder's JSONL file) and counts in the Prometheus aggregates."""
    from prometheus_client import REGISTRY

    def pruned_count():
        return REGISTRY.get_sample_value("visipruner_pruned_requests_total", {"method": "fastv"}) or 0.0

    cfg = FastVConfig(layer=1, keep_ratio=0.25)
    record = tmp_path / "records.jsonl"
    before = pruned_count()
    llm = _engine(folder("fastv", config=cfg, record=record))
    alone = _vllm_alone(llm, REQUESTS)
    batched = _vllm_staggered(llm, REQUESTS)
    for a, b in zip(alone, batched):
        assert _answer(a)[0] == _answer(b)[0]
        assert max(abs(x - y) for x, y in zip(_answer(a)[1], _answer(b)[1])) < 1e-4
    records = _check_against_hf(tiny, batched, cfg)
    assert all(rec["visual_tokens_per_layer"][2] == (rec["visual_tokens"] + 3) // 4 for rec in records)
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    image_requests = sum(bool(r.images) for r in REQUESTS)
    assert len(lines) == 2 * image_requests  # alone, then batched; text-only requests are not pruned
    assert records == lines[image_requests:]
    assert pruned_count() - before == 2 * image_requests
    del llm


def test_preempted_requests_replay_their_decisions(tiny, folder):
    """A KV cache too small for all requests at once: vLLM preempts some and recomputes them from their
    prompt and generated tokens; the plugin recognises the recomputation and replays the request's own
    decisions, so every answer still equals the HF runtime's run alone."""
    cfg = FastVConfig(layer=1, keep_ratio=0.25)
    per_token = LAYERS * 2 * 2 * 32 * 4  # layers x (K, V) x KV heads x head dim x float32
    llm = _engine(folder("preempted", config=cfg), kv_cache_memory_bytes=per_token * 640)
    requests = REQUESTS[:6]
    outputs = llm.generate([r.vllm_prompt() for r in requests], [_params(r.max_tokens + 64) for r in requests])
    resumed = llm.apply_model(lambda model: model.visipruner.resumed)[0]
    assert resumed > 0, "no request was preempted: make the KV cache smaller"
    for r, out in zip(requests, outputs):
        longer = Request(REQUESTS.index(r))
        longer.max_tokens = r.max_tokens + 64
        tokens, logprobs, _, _ = _hf(tiny, longer, cfg)
        assert _answer(out)[0] == tokens
        assert max(abs(a - b) for a, b in zip(_answer(out)[1], logprobs)) < 1e-4
    del llm


# thresholds on this model's influence scale (checked below to fire: a fusion layer with a strict
# subset of critical tokens, and an exit layer, for the image requests)
MEASURED = VisiPrunerConfig(stages=("middle", "deep"), shallow_layers=1, layer_threshold=0.85,
                            tokens_threshold=0.02, relative_tokens_threshold=True, exit_threshold=0.93,
                            exit_patience=1)


def test_visipruner_measured_equals_hf(tiny, folder):
    llm = _engine(folder("visipruner", config=MEASURED))
    records = _check_against_hf(tiny, _vllm_staggered(llm, REQUESTS), MEASURED)
    fused = [r for r in records if r["fusion_layer"] is not None]
    assert len(fused) >= len(records) // 2
    assert any(0 < r["critical_tokens"] < r["visual_tokens"] for r in fused)
    assert any(r["exit_layer"] is not None for r in fused)
    del llm


def test_visipruner_forced_schedule_equals_hf(tiny, folder):
    schedule = Schedule(fusion_layer=1, critical_tokens=[0, 5, 9, 30, 63], exit_layer=3)
    cfg = VisiPrunerConfig(stages=("middle", "deep"), shallow_layers=1)
    llm = _engine(folder("schedule", config=cfg, schedule=schedule))
    records = _check_against_hf(tiny, _vllm_staggered(llm, REQUESTS), cfg, schedule)
    assert all(r["visual_tokens_per_layer"][2:4] == [5, 5] and r["visual_tokens_per_layer"][4:] == [0, 0]
               for r in records)
    del llm


# the in-LLM peers on the plugin's mechanism, each with the visual tokens per layer it must leave
# (64 per image; the 2-image requests hold 128): PyramidDrop halves them at layers 1 and 3, VTW
# removes them all after layer 2, random keeps a seeded quarter after layer 1 (its choice per prompt)
PEERS = {
    "pdrop": (PDropConfig(layers=(1, 3), keep_ratio=0.5), lambda n: [n, n, n // 2, n // 2, n // 4, n // 4]),
    "vtw": (VTWConfig(layer=2), lambda n: [n, n, n, 0, 0, 0]),
    "random": (RandomConfig(layer=1, keep_ratio=0.25, seed=3), lambda n: [n, n] + [n // 4] * 4),
}


@pytest.mark.parametrize("name", PEERS)
def test_peer_methods_equal_hf(tiny, folder, name):
    """PyramidDrop, VTW and random under the plugin: per request the HF runtime's decisions, tokens and
    log-probs, in one staggered batch of image and text-only requests."""
    cfg, per_layer = PEERS[name]
    llm = _engine(folder(name, config=cfg))
    records = _check_against_hf(tiny, _vllm_staggered(llm, REQUESTS), cfg)
    del llm
    assert len(records) == sum(bool(r.images) for r in REQUESTS)
    assert all(rec["method"] == name and rec["visual_tokens_per_layer"] == per_layer(rec["visual_tokens"])
               for rec in records)


def test_llava_qwen2_language_model_equals_hf(tmp_path):
    """LLaVA-1.5 with a Qwen2 language model (q/k/v biases; vLLM's Qwen2Model under the plugin): FastV's
    choice, scored from that model's own queries and keys, per request equal to the HF runtime's."""
    tiny = tiny_model(lm="qwen2")
    assert type(tiny[0].model.language_model).__name__ == "Qwen2Model"
    cfg = FastVConfig(layer=1, keep_ratio=0.25)
    llm = _engine(save_for_vllm(*tiny, tmp_path / "qwen2", config=cfg))
    records = _check_against_hf(tiny, _vllm_staggered(llm, REQUESTS), cfg)
    del llm
    assert records and all(r["visual_tokens_per_layer"][2:] == [(r["visual_tokens"] + 3) // 4] * 4 for r in records)


# ------------------------------------------------------------------ KV memory after a vision-exit bound
# fusion by layer 2 keeping 8 tokens, every visual token gone by layer 5: layers 3-4 hold text + 8 visual
# tokens at most, layer 5 text only; vLLM's groups: one layer each (3 full, 2 bounded, 1 text only)
BOUNDED = dataclasses.replace(MEASURED, exit_by=5, keep_tokens=8, fusion_fallback_layer=2)
# CPU blocks of 32 tokens; 1.5 MiB is 96 layer-blocks (32 tokens x 2 KV heads x 32 x (K, V) x float32 = 16 KiB)
TIGHT = dict(block_size=32, max_model_len=256, kv_cache_memory_bytes=3 * 2**19)


def _held(llm, requests, max_tokens):
    """``requests`` submitted at once; (outputs, most requests running at once, each request's largest
    layer-blocks (blocks x layers a block spans, over its KV-cache groups), highest KV-cache usage), read
    from vLLM's own scheduler."""
    eng = llm.llm_engine
    sched = eng.engine_core.engine_core.scheduler  # the engine in this process
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    span = max(len(g.layer_names) for g in sched.kv_cache_config.kv_cache_groups)
    for i, r in enumerate(requests):
        eng.add_request(str(i), r.vllm_prompt(), _params(max_tokens))
    done, most, blocks, usage = {}, 0, {}, 0.0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[int(out.request_id)] = out
        most, usage = max(most, len(sched.running)), max(usage, sched.kv_cache_manager.usage)
        for r in sched.running:
            i = int(r.request_id.split("-")[0])
            blocks[i] = max(blocks.get(i, ()), tuple(span * len(m.req_to_blocks[r.request_id]) for m in managers))
    return [done[i] for i in range(len(requests))], most, blocks, usage


def test_exit_bound_allocates_fewer_kv_blocks(tiny, folder):
    """``exit_by`` (and a fusion budget by ``fusion_fallback_layer``): the bounded layers are vLLM KV-cache
    groups of their own whose blocks hold a request's text and at most the bound's visual tokens. Per
    request the HF runtime's decisions, tokens and log-probs (a staggered batch of image and text-only
    requests); with a small KV budget vLLM's own accounting holds more requests at once than without
    the bounds, with fewer blocks per image request, the same for text-only requests, and requests it
    preempts and recomputes still give the HF runtime's answers."""
    from visipruner.vllm.kv_memory import SCHEDULER

    path = folder("bounded", config=BOUNDED)
    llm = _engine(path, scheduler_cls=SCHEDULER)
    groups = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config.kv_cache_groups
    specs = {int(name.split(".")[-3]): g.kv_cache_spec for g in groups for name in g.layer_names}
    assert [type(specs[i]).__name__ for i in range(LAYERS)] == ["FullAttentionSpec"] * 3 + ["BoundedAttentionSpec"] * 3
    assert [specs[i].keep_tokens for i in range(3, LAYERS)] == [8, 8, 0] and len(groups) == LAYERS
    records = _check_against_hf(tiny, _vllm_staggered(llm, REQUESTS), BOUNDED)
    assert all(r["fusion_layer"] <= 2 and max(r["visual_tokens_per_layer"][3:]) <= 8
               and r["visual_tokens_per_layer"][5] == 0 for r in records)
    del llm

    mix = [REQUESTS[2], REQUESTS[6], REQUESTS[1]] * 3  # two images each, and text only
    bounded = _engine(path, scheduler_cls=SCHEDULER, **TIGHT)
    outs, most, blocks, usage = _held(bounded, mix, 40)
    resumed = bounded.apply_model(lambda model: model.visipruner.resumed)[0]
    del bounded
    whole = _engine(folder("unbounded", config=MEASURED), **TIGHT)  # vLLM's allocation: every token, every layer
    _, most_whole, blocks_whole, usage_whole = _held(whole, mix, 40)
    del whole
    for i, r in enumerate(mix):
        if r.images:
            assert sum(blocks[i]) <= 0.75 * sum(blocks_whole[i])
        else:
            assert len(set(blocks[i])) == 1 and sum(blocks[i]) == sum(blocks_whole[i])
    assert most >= 1.5 * most_whole and usage_whole > 0.9
    assert resumed > 0, "no request was preempted: make the KV budget smaller"
    for r, out in zip(mix[:3], outs[:3]):
        longer = Request(REQUESTS.index(r))
        longer.max_tokens = 40
        tokens, logprobs, _, _ = _hf(tiny, longer, BOUNDED)
        assert _answer(out)[0] == tokens
        assert max(abs(a - b) for a, b in zip(_answer(out)[1], logprobs)) < 1e-4


@pytest.mark.parametrize("overrides, config, message", [
    (dict(enable_prefix_caching=True), None, "enable_prefix_caching=False (--no-enable-prefix-caching)"),
    (dict(enable_chunked_prefill=True), None, "enable_chunked_prefill=False (--no-enable-chunked-prefill)"),
    (dict(enforce_eager=False), None, "enforce_eager=True (--enforce-eager)"),
    ({}, VisiPrunerConfig(), "the shallow stage"),
    ({}, CDPrunerConfig(keep_ratio=0.25), "selects before the first layer"),
    ({}, BOUNDED, "--scheduler-cls visipruner.vllm.kv_memory.BoundedKVScheduler"),
    (dict(scheduler_cls="visipruner.vllm.kv_memory.BoundedKVScheduler", disable_hybrid_kv_cache_manager=True), BOUNDED,
     "without disable_hybrid_kv_cache_manager"),
])
def test_refused_settings(folder, overrides, config, message):
    path = folder("refused", config=config or MEASURED)
    with pytest.raises(Exception) as e:
        _engine(path, **overrides)
    text = str(e.value)
    assert message in text and "\n" not in text


# ------------------------------------------------------------------------- Qwen2-VL, Qwen2.5-VL
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def tiny_qwen_vl_with_processor(version: str):
    """A tiny random Qwen2-VL / Qwen2.5-VL (head dimension 32, M-RoPE sections 4/6/6) whose vocabulary
    is a tiny tokenizer's, and its processor (images of 16 to 64 pixels a side: 4 to 16 visual tokens)."""
    import transformers as tf

    from visipruner.testing import tiny_tokenizer

    tok = tiny_tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in dict(
        image_token_id="<|image_pad|>", video_token_id="<|video_pad|>", vision_start_token_id="<|vision_start|>",
        vision_end_token_id="<|vision_end|>").items()}
    text = dict(vocab_size=len(tok) + 2, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
                eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    grid = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if version == "2":
        C, M, P = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
        vision = dict(depth=1, embed_dim=32, hidden_size=128, num_heads=2, mlp_ratio=2, **grid)
    else:
        C, M, P = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128, window_size=16,
                      fullatt_block_indexes=[1], **grid)
    torch.manual_seed(0)
    model = M(C(text_config=text, vision_config=vision, **ids)).float().eval()
    _redraw_language_model(model.model.language_model, model.lm_head)
    pixels = dict(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=4, merge_size=2, temporal_patch_size=2)
    proc = P(image_processor=tf.Qwen2VLImageProcessor(**pixels), video_processor=tf.Qwen2VLVideoProcessor(**pixels),
             tokenizer=tok, chat_template=QWEN_TEMPLATE)
    return model, proc


class QwenRequest(Request):
    def __init__(self, i: int, sizes):
        self.max_tokens = 4 + i
        self.images = [_image(i).resize(s) for s in sizes]
        self.prompt = ("<|im_start|>user\n" + QWEN_IMAGE * len(sizes) + QUESTIONS[i]
                       + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_vl_mrope_equals_hf(version, tmp_path):
    """Qwen2-VL / Qwen2.5-VL: kept tokens keep their 3-D positions and decode continues from vLLM's
    mrope_position_delta; per request FastV's and VisiPruner's decisions, tokens and log-probs equal
    the HF runtime's, in one staggered batch (images of different sizes, two images, text only); with
    ``exit_by`` too (vLLM's placeholders say which tokens the text-only KV layers need no blocks for)."""
    tiny = tiny_qwen_vl_with_processor(version)
    requests = [QwenRequest(0, [(32, 32)]), QwenRequest(1, []), QwenRequest(2, [(64, 48)]),
                QwenRequest(3, [(32, 64), (32, 32)])]
    # thresholds with no score within float error of them (vLLM's and SDPA's attention differ by ~1e-7;
    # a token whose ||c_j|| / ||o|| sat at 0.05 went either way)
    configs = [FastVConfig(layer=1, keep_ratio=0.25),
               VisiPrunerConfig(stages=("middle", "deep"), shallow_layers=1, layer_threshold=0.99,
                                tokens_threshold=0.07, relative_tokens_threshold=True, exit_threshold=0.9,
                                exit_patience=1)]
    configs.append(dataclasses.replace(configs[1], exit_by=4))  # and layers 4-5 allocated for text only
    for k, cfg in enumerate(configs):
        bounded = dict(scheduler_cls="visipruner.vllm.kv_memory.BoundedKVScheduler") if k == 2 else {}
        llm = _engine(save_for_vllm(*tiny, tmp_path / f"m{k}", config=cfg), **bounded)
        outputs = _vllm_staggered(llm, requests)
        del llm
        pruned = 0
        for r, out in zip(requests, outputs):
            tokens, logprobs, stats, prompt = _hf(tiny, r, cfg)
            assert list(out.prompt_token_ids) == prompt
            v_tokens, v_logprobs = _answer(out)
            assert v_tokens == tokens
            assert max(abs(a - b) for a, b in zip(v_logprobs, logprobs)) < 1e-4
            if r.images:
                rec = _record(prompt)
                assert rec["visual_tokens_per_layer"] == stats.visual_tokens_per_layer
                assert (rec["fusion_layer"], rec["exit_layer"]) == (stats.fusion_layer, stats.exit_layer)
                pruned += rec["visual_tokens_per_layer"][-1] < rec["visual_tokens"]
        assert pruned >= 2  # the method removed tokens for most image requests
