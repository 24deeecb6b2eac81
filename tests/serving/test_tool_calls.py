"""Tool calling against the live app with the official `openai` client: tool_choice `required` and a named function
give `tool_calls` whose arguments validate against the tool's schema, streamed as deltas that reassemble to the same
calls; a named function and `parallel_tool_calls: false` give exactly one call and finish_reason `tool_calls` (with
parallel calls allowed the random model may go on calling until max_tokens: the complete calls are checked); the tool's result sent back
with role `tool` continues the conversation; `none` and `auto` leave content alone; a `tool_choice` naming an
unknown tool, or tools with a bad parameter schema, are 400s and the server stays healthy."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from serve_helpers import assert_openai_error

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"enum": ["celsius", "fahrenheit"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                      "b": {"type": "integer", "minimum": 0, "maximum": 99}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MSG = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "What is 2 plus 3?"}]


def _check_calls(calls, names=None) -> None:
    assert calls, "no tool calls"
    for c in calls:
        assert c.type == "function" and c.id
        assert names is None or c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def _create(served, **kw):
    return served.client().chat.completions.create(
        model=served.name, messages=kw.pop("messages", MSG), tools=TOOLS, temperature=0, max_tokens=kw.pop("max_tokens", 160), **kw)


def _streamed_calls(served, **kw) -> tuple[list[dict], str]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in _create(served, stream=True, **kw):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                c["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_validate_and_stream_the_same(served, choice):
    with ThreadPoolExecutor(3) as pool:
        whole = pool.submit(_create, served, tool_choice=choice)
        single = pool.submit(_create, served, tool_choice=choice, parallel_tool_calls=False)
        streamed = pool.submit(_streamed_calls, served, tool_choice=choice)
    ch = whole.result().choices[0]
    _check_calls(ch.message.tool_calls, None if choice == "required" else {"add"})
    assert not ch.message.content
    if choice == "required":
        assert ch.finish_reason in ("tool_calls", "length")
    else:
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    one = single.result().choices[0]
    _check_calls(one.message.tool_calls)
    assert len(one.message.tool_calls) == 1 and one.finish_reason == "tool_calls"
    calls, finish = streamed.result()
    assert finish == ch.finish_reason
    assert [(c["name"], c["arguments"]) for c in calls][:len(ch.message.tool_calls)] == [
        (c.function.name, c.function.arguments) for c in ch.message.tool_calls]
    assert all(c["id"] for c in calls)


def test_tool_result_continues_the_conversation(served):
    first = _create(served, tool_choice="required").choices[0].message
    turn = [{"role": "assistant", "content": None,
             "tool_calls": [c.model_dump(include={"id", "type", "function"}) for c in first.tool_calls]}]
    turn += [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"result": 5})} for c in first.tool_calls]
    messages = MSG + turn
    prompt = httpx.post(f"{served.url}/tokenize", json={"messages": messages}).json()["tokens"]
    text = httpx.post(f"{served.url}/detokenize", json={"tokens": prompt}).json()["prompt"]
    assert "<｜tool▁outputs▁begin｜>" in text and text.endswith("<｜tool▁outputs▁end｜>")
    assert first.tool_calls[0].function.arguments in text            # the earlier call is in the prompt
    second = _create(served, messages=messages, tool_choice="auto", max_tokens=8,
                     extra_body={"ignore_eos": True}).choices[0]
    assert second.finish_reason == "length" and second.message.content and not second.message.tool_calls
    # tool_choice none: plain content, no parsing
    r = _create(served, tool_choice="none", max_tokens=8, extra_body={"ignore_eos": True}).choices[0]
    assert r.message.content and not r.message.tool_calls and r.finish_reason == "length"


@pytest.mark.parametrize("body, param, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tool_choice", "nonsense"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "pattern"),
])
def test_bad_tool_requests_are_400(served, body, param, words):
    r = httpx.post(f"{served.url}/v1/chat/completions", timeout=60,
                   json={"model": served.name, "messages": MSG, "max_tokens": 4, **body})
    err = assert_openai_error(r, 400)
    assert err["param"] == param and words in err["message"], err
    assert _create(served, tool_choice="required", parallel_tool_calls=False).choices[0].finish_reason == "tool_calls"
    assert httpx.get(f"{served.url}/health").status_code == 200
