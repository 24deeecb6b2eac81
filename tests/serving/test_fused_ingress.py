"""`ingress: fused`: the OpenAI routes served by the replica that owns the engine (one deployment, ModelServer, plus
the metrics collector). The same greedy answers as the two-deployment app, streamed and not; its own admission
(one running plus one queued here) answers 429 in OpenAI's format with Retry-After at once; a client that leaves
mid-stream frees its KV blocks; /metrics covers the engine."""
from __future__ import annotations

import asyncio

import pytest
from ray import serve

from serve_helpers import app_args, burst, check_disconnect_frees_kv, check_over_capacity, deploy, metric_values

MSG = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def fused(serve_http, tiny_ckpt_fp32):
    s = deploy(serve_http, "fused", "/fused", app_args(tiny_ckpt_fp32, ingress="fused", max_ongoing_requests=1,
                                                       max_queued_requests=1))
    yield s
    serve.delete("fused")


def test_fused_app_is_one_deployment_with_the_same_answers(fused, served):
    assert set(serve.status().applications[fused.app].deployments) == {"ModelServer", "MetricsCollector"}
    a, b = fused.client(), served.client()
    kw = dict(model="tiny", messages=MSG, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    ra, rb = a.chat.completions.create(**kw), b.chat.completions.create(**kw)
    assert ra.choices[0].message.content == rb.choices[0].message.content and ra.usage == rb.usage
    parts, usage = [], None
    for chunk in a.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        parts.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(parts) == ra.choices[0].message.content and usage == ra.usage
    ca = a.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=6, temperature=0, logprobs=2)
    cb = b.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=6, temperature=0, logprobs=2)
    assert ca.choices[0].text == cb.choices[0].text
    assert ca.choices[0].logprobs.tokens == cb.choices[0].logprobs.tokens


def test_fused_over_capacity_gets_openai_429(fused):
    check_over_capacity(asyncio.run(burst(fused.url, {}, 6)))


def test_fused_disconnect_frees_kv_blocks_and_metrics_cover_the_engine(fused):
    check_disconnect_frees_kv(fused.url, fused.name)
    import httpx
    text = httpx.get(f"{fused.url}/metrics").text
    assert metric_values(text, "raymoe:num_replicas") == [1.0]
    assert metric_values(text, "vllm:time_to_first_token_seconds_count")[0] >= 1
