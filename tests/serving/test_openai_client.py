"""The official `openai` client against the live app: chat, streaming, completions with logprobs, models, n=2,
stop strings, unknown model, tokenize/detokenize, and /metrics naming vLLM's metrics."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

MSG = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is two plus two?"}]


def test_chat_and_streamed_chat_agree(served):
    c = served.client()
    r = c.chat.completions.create(model=served.name, messages=MSG, max_tokens=24, temperature=0)
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.finish_reason in ("stop", "length") and ch.message.content
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    parts, usage, finish = [], None, None
    for chunk in c.chat.completions.create(model=served.name, messages=MSG, max_tokens=24, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for cc in chunk.choices:
            parts.append(cc.delta.content or "")
            finish = cc.finish_reason or finish
    assert "".join(parts) == ch.message.content
    assert finish == ch.finish_reason
    assert usage is not None and usage.model_dump() == r.usage.model_dump()
    # max_completion_tokens bounds the answer the same way
    r2 = c.chat.completions.create(model=served.name, messages=MSG, max_completion_tokens=3, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r2.usage.completion_tokens == 3 and r2.choices[0].finish_reason == "length"


def test_chat_logprobs_seed_and_penalties(served):
    c = served.client()
    kw = dict(model=served.name, messages=MSG, max_tokens=8, temperature=0.8, top_p=0.9, seed=7, logprobs=True,
              top_logprobs=3, presence_penalty=0.5, frequency_penalty=0.5, user="tester",
              extra_body={"top_k": 20, "min_p": 0.01, "ignore_eos": True})
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content      # seeded: reproducible
    lps = a.choices[0].logprobs.content
    assert len(lps) == 8 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lps)
    # extreme-but-valid values the fuzz found: they once overflowed or zeroed the sampler's probabilities (500)
    for extreme in ({"temperature": 1e-300}, {"top_p": 1e-300}, {"top_p": 5e-324, "temperature": 1.5}):
        r = c.chat.completions.create(model=served.name, messages=MSG, max_tokens=3, **extreme)
        assert r.usage.completion_tokens >= 1


def test_completions_with_logprobs_and_echo(served):
    c = served.client()
    r = c.completions.create(model=served.name, prompt="The capital of France is", max_tokens=6, temperature=0,
                             logprobs=2, extra_body={"ignore_eos": True})
    ch = r.choices[0]
    assert len(ch.logprobs.tokens) == 6 == len(ch.logprobs.token_logprobs) == len(ch.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in ch.logprobs.token_logprobs)
    assert all(len(t) <= 2 for t in ch.logprobs.top_logprobs)
    assert "".join(ch.logprobs.tokens) == ch.text
    assert r.usage.completion_tokens == 6
    ids = httpx.post(f"{served.url}/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    e = c.completions.create(model=served.name, prompt=ids, max_tokens=6, temperature=0, echo=True,
                             extra_body={"ignore_eos": True})
    assert e.choices[0].text.endswith(ch.text) and e.choices[0].text.startswith("The capital of France is")
    streamed = "".join(x.choices[0].text for x in c.completions.create(
        model=served.name, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if x.choices)
    assert streamed == ch.text


def test_models_list_and_tokenize_roundtrip(served):
    c = served.client()
    models = c.models.list().data
    assert models[0].id == served.name and getattr(models[0], "parent", None) is None   # then its LoRA adapters
    assert all(m.parent == served.name for m in models[1:])
    tok = httpx.post(f"{served.url}/tokenize", json={"prompt": "Hello, world!"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 131072
    back = httpx.post(f"{served.url}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    assert back.endswith("Hello, world!")
    chat = httpx.post(f"{served.url}/tokenize", json={"messages": MSG}).json()
    assert chat["count"] > tok["count"]


def test_n2_choices(served):
    c = served.client()
    r = c.chat.completions.create(model=served.name, messages=MSG, max_tokens=5, temperature=1.0, seed=3, n=2,
                                  extra_body={"ignore_eos": True})
    assert [ch.index for ch in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 10
    got = {0: "", 1: ""}
    for chunk in c.chat.completions.create(model=served.name, messages=MSG, max_tokens=5, temperature=1.0, seed=3,
                                           n=2, stream=True, extra_body={"ignore_eos": True}):
        for cc in chunk.choices:
            got[cc.index] += cc.delta.content or ""
    assert got == {0: r.choices[0].message.content, 1: r.choices[1].message.content}


def test_stop_strings(served):
    c = served.client()
    full = c.completions.create(model=served.name, prompt="Hello, world!", max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    r = c.completions.create(model=served.name, prompt="Hello, world!", max_tokens=24, temperature=0, stop=[stop],
                             extra_body={"ignore_eos": True}).choices[0]
    assert r.finish_reason == "stop" and r.text == full[:full.find(stop)]


def test_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError) as e:
        served.client().chat.completions.create(model="gpt-5", messages=MSG, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_metrics_use_vllm_names(served):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 8       # several full KV blocks
    for _ in range(2):                          # the second one reuses the first one's cached blocks
        served.client().completions.create(model=served.name, prompt=long_prompt, max_tokens=3)
    deadline = time.time() + 10                 # replicas report every 0.25 s
    while time.time() < deadline:
        text = httpx.get(f"{served.url}/metrics").text
        if _value(text, "raymoe:prefix_cache_hits_total") > 0:
            break
        time.sleep(0.25)
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_sum", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "raymoe:prefix_cache_hit_rate", "raymoe:num_replicas", "vllm:request_success_total"):
        assert name in text, name
    assert _value(text, "vllm:generation_tokens_total") > 0
    assert _value(text, "raymoe:prefix_cache_hits_total") > 0
    assert _value(text, "raymoe:expert_routed_tokens_total") > 0          # the first MoE layer's tokens
    assert _value(text, "raymoe:expert_load_max_over_mean") >= 1.0


def _value(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name + "{")).split()[-1])
