"""The vLLM plugin behind vLLM's OpenAI-compatible server, started as a user would, asked by the
``openai`` client: concurrent chat completions with base64 images answer as the offline engine does,
``/metrics`` carries the plugin's aggregates, and a refused setting stops the server with its line.

The server is ``vllm serve`` through ``python -m visipruner.vllm.cpu_cli serve`` (the CPU test
environment's plumbing, then vLLM's own server code; see that module).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import os
import socket
import subprocess
import sys
import time

import pytest

import test_vllm as t  # the tiny model, its requests and the engine settings (skips without vLLM)
from visipruner import FastVConfig

SERVE_OPTIONS = ["--enforce-eager", "--no-enable-chunked-prefill", "--max-model-len", "512",
                 "--max-num-batched-tokens", "2048", "--dtype", "float32", "--gpu-memory-utilization", "0.1",
                 "--kv-cache-memory-bytes", str(2**27), "--limit-mm-per-prompt", '{"image": 2}', "--seed", "0"]
CONFIG = FastVConfig(layer=1, keep_ratio=0.25)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(path, port, *options, env=None):
    cmd = [sys.executable, "-m", "visipruner.vllm.cpu_cli", "serve", str(path), "--port", str(port),
           *SERVE_OPTIONS, *options]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, **(env or {})))


def _chat(client, model, request):
    content = []
    for im in request.images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": t.QUESTIONS[t.REQUESTS.index(request)]})
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=request.max_tokens,
        temperature=0, logprobs=True, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    content = resp.choices[0].logprobs.content  # tokens as "token_id:<id>"
    return [int(x.token.split(":")[1]) for x in content], [x.logprob for x in content]


def test_openai_server_answers_as_offline_engine(t_folder_pruned, tmp_path):
    """Also: a second server with vLLM's default (prefix caching on), started alongside, stops at start
    with the plugin's one line."""
    import requests
    from openai import OpenAI

    path = t_folder_pruned
    port = _free_port()
    server = _serve(path, port, "--no-enable-prefix-caching", env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    refused = _serve(path, _free_port())
    try:
        # the offline engine's answers, computed while the server starts
        llm = t._engine(path)
        offline = [t._answer(out) for out in t._vllm_alone(llm, t.REQUESTS)]
        del llm
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "the server did not start in 240 s"
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        with cf.ThreadPoolExecutor(len(t.REQUESTS)) as ex:
            answers = list(ex.map(lambda r: _chat(client, str(path), r), t.REQUESTS))
        for (tokens, logprobs), (o_tokens, o_logprobs) in zip(answers, offline):
            assert tokens == o_tokens
            assert max(abs(a - b) for a, b in zip(logprobs, o_logprobs)) < 1e-4
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        line = next(m for m in metrics.splitlines() if m.startswith('visipruner_pruned_requests_total{method="fastv"}'))
        assert float(line.split()[-1]) == sum(bool(r.images) for r in t.REQUESTS)
        out, _ = refused.communicate(timeout=240)
        assert refused.returncode != 0
        assert "visipruner: prefix caching shares KV blocks between prompts" in out
        assert "enable_prefix_caching=False (--no-enable-prefix-caching)" in out
    finally:
        for p in (server, refused):
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=60)


@pytest.fixture(scope="module")
def t_folder_pruned(tmp_path_factory):
    model, proc = t.tiny_model()
    return t.save_for_vllm(model, proc, tmp_path_factory.mktemp("served"), config=CONFIG)
