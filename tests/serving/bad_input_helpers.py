"""The serving issue's bad-input table and its request helpers, shared by the bad-input tests of both engines."""
from __future__ import annotations

import json

import httpx

CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
OK_MSG = [{"role": "user", "content": "Hi"}]


def chat(**kw):
    return {"model": "tiny", "messages": OK_MSG, "max_tokens": 2, **kw}


def drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


# (id, method, path, body: dict | bytes | None, status, param the error must name, or None to skip that check)
CASES = [
    ("malformed-json", "POST", CHAT, b'{"model": "tiny", "messages": [', 400, None),
    ("empty-body", "POST", CHAT, b"", 400, None),
    ("json-array-body", "POST", CHAT, b"[1, 2]", 400, None),
    ("invalid-utf8", "POST", CHAT, b'{"model":"tiny","messages":[{"role":"user","content":"\xff\xfe"}]}', 400, None),
    ("missing-messages", "POST", CHAT, drop(chat(), "messages"), 400, "messages"),
    ("empty-messages", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("messages-not-list", "POST", CHAT, chat(messages="hi"), 400, "messages"),
    ("unknown-role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role"),
    ("missing-content", "POST", CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content"),
    ("content-wrong-type", "POST", CHAT, chat(messages=[{"role": "user", "content": 12}]), 400,
     "messages[0].content"),
    ("model-wrong-type", "POST", CHAT, chat(model=5), 400, "model"),
    ("missing-model", "POST", CHAT, drop(chat(), "model"), 400, "model"),
    ("max-tokens-negative", "POST", CHAT, chat(max_tokens=-5), 400, "max_tokens"),
    ("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-huge", "POST", CHAT, chat(max_tokens=10 ** 9), 400, "max_tokens"),
    ("max-tokens-beyond-kv-cache", "POST", CHAT, chat(max_tokens=5000), 400, "max_tokens"),   # the engine refuses
    ("max-tokens-string", "POST", CHAT, chat(max_tokens="10"), 400, "max_tokens"),
    ("max-completion-tokens-negative", "POST", CHAT, chat(max_completion_tokens=-1), 400, "max_completion_tokens"),
    ("temperature-negative", "POST", CHAT, chat(temperature=-0.5), 400, "temperature"),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("temperature-too-high", "POST", CHAT, chat(temperature=3), 400, "temperature"),
    ("top-p-above-1", "POST", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("top-p-zero", "POST", CHAT, chat(top_p=0), 400, "top_p"),
    ("n-zero", "POST", CHAT, chat(n=0), 400, "n"),
    ("n-huge", "POST", CHAT, chat(n=100), 400, "n"),
    ("presence-penalty", "POST", CHAT, chat(presence_penalty=5), 400, "presence_penalty"),
    ("frequency-penalty", "POST", CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty"),
    ("top-logprobs-huge", "POST", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("top-logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("stop-wrong-type", "POST", CHAT, chat(stop=5), 400, "stop"),
    ("stream-wrong-type", "POST", CHAT, chat(stream="yes"), 400, "stream"),
    ("stream-options-without-stream", "POST", CHAT, chat(stream_options={"include_usage": True}), 400,
     "stream_options"),
    ("unsupported-field", "POST", CHAT, chat(functions=[{"name": "f"}]), 400, "functions"),
    ("tool-without-function", "POST", CHAT, chat(tools=[{"type": "function"}]), 400, "tools[0].function"),
    ("seed-float", "POST", CHAT, chat(seed=1.5), 400, "seed"),
    ("min-p-above-1", "POST", CHAT, chat(min_p=2), 400, "min_p"),
    ("top-k-below-minus-1", "POST", CHAT, chat(top_k=-5), 400, "top_k"),
    ("prompt-beyond-context", "POST", CMPL, {"model": "tiny", "prompt": [5] * 131073}, 400, "prompt"),
    ("prompt-plus-max-tokens-beyond-context", "POST", CMPL,
     {"model": "tiny", "prompt": [5] * 131000, "max_tokens": 100}, 400, "max_tokens"),
    ("prompt-token-outside-vocab", "POST", CMPL, {"model": "tiny", "prompt": [10 ** 7]}, 400, "prompt"),
    ("completion-logprobs-huge", "POST", CMPL, {"model": "tiny", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("completion-missing-prompt", "POST", CMPL, {"model": "tiny"}, 400, "prompt"),
    ("completion-batched-prompts", "POST", CMPL, {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ("unknown-model", "POST", CHAT, chat(model="gpt-5"), 404, "model"),
    ("unknown-route", "GET", "/v1/nope", None, 404, None),
    ("wrong-method", "GET", CHAT, None, 405, None),
    ("detokenize-bad-id", "POST", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("tokenize-nothing", "POST", "/tokenize", {}, 400, "prompt"),
]


def send(base: str, method: str, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    h = {"content-type": "application/json", **(headers or {})}
    return httpx.request(method, base + path, content=content, headers=h, timeout=60)


def valid_request_succeeds(base: str, headers: dict | None = None) -> None:
    r = send(base, "POST", CHAT, chat(max_tokens=1), headers)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1
