"""Structured outputs against the live app (the session's `served`): LangChain's `with_structured_output` over 20
pydantic schemas, streamed and not; vLLM's structured_outputs (regex, choice, json, grammar) and response_format
json_object on chat and completions; reasoning split from <think> markers; bad grammars -> 400, server healthy.

The tiny model's weights are random, so every valid output here is the grammar's doing. Requests run concurrently
(the engine batches them) and max_tokens stays small to keep this module fast on two cores.
"""
from __future__ import annotations

import enum
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from serve_helpers import assert_openai_error

MSG = [{"role": "user", "content": "Answer in JSON."}]


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Point(BaseModel):
    x: int = Field(ge=-100, le=100)
    y: int = Field(ge=-100, le=100)


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)


class Flag(BaseModel):
    on: bool


class Pick(BaseModel):
    color: Color


class Level(BaseModel):
    level: Literal["low", "mid", "high"]


class Score(BaseModel):
    score: float = Field(ge=0, le=1)


class Temperature(BaseModel):
    celsius: float = Field(ge=-50, le=60)
    city: str = Field(max_length=10)


class Tags(BaseModel):
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)


Small = Annotated[int, Field(ge=0, le=99)]      # a random model writes unbounded integers until max_tokens


class Numbers(BaseModel):
    values: list[Small] = Field(max_length=4)


class Segment(BaseModel):
    start: Point
    end: Point


class Team(BaseModel):
    lead: Person
    size: int = Field(ge=1, le=9)


class Inventory(BaseModel):
    items: list[Person] = Field(max_length=2)


class Ticket(BaseModel):
    id: int = Field(ge=1, le=9999)
    priority: Level
    done: bool


class Palette(BaseModel):
    primary: Color
    others: list[Color] = Field(max_length=2)


class Rect(BaseModel):
    origin: Point
    width: int = Field(ge=0, le=50)
    height: int = Field(ge=0, le=50)


class Survey(BaseModel):
    answer: Literal["yes", "no"]
    confidence: float = Field(ge=0, le=1)
    note: str = Field(max_length=6)


class Matrix(BaseModel):
    rows: list[Annotated[list[Small], Field(max_length=3)]] = Field(max_length=2)


class Config(BaseModel):
    name: str = Field(max_length=6)
    enabled: bool
    retries: int = Field(ge=0, le=5)
    mode: Literal["fast", "safe"]


class Deep(BaseModel):
    team: Team
    flag: Flag


class Drawing(BaseModel):
    segment: Segment
    pick: Pick


SCHEMAS = [Point, Person, Flag, Pick, Level, Score, Temperature, Tags, Numbers, Segment, Team, Inventory, Ticket,
           Palette, Rect, Survey, Matrix, Config, Deep, Drawing]


def _llm(served):
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(model=served.name, base_url=f"{served.url}/v1", api_key="none", temperature=0, max_tokens=160,
                      max_retries=0, timeout=120)


def _invoke(served, schema):
    return _llm(served).with_structured_output(schema).invoke("Fill in the fields.")


def _stream(served, schema):
    last = None
    for chunk in _llm(served).with_structured_output(schema).stream("Fill in the fields."):
        last = chunk
    return last


@pytest.mark.parametrize("mode", ["invoke", "stream"])
def test_langchain_with_structured_output_20_schemas(served, mode):
    fn = _invoke if mode == "invoke" else _stream
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: fn(served, s), SCHEMAS))
    for schema, got in zip(SCHEMAS, results):
        assert isinstance(got, schema), (schema.__name__, got)
        schema.model_validate(got.model_dump())            # bounds, enums, lengths hold


def _chat(served, **kw):
    return httpx.post(f"{served.url}/v1/chat/completions", timeout=60,
                      json={"model": served.name, "messages": MSG, "temperature": 0, "max_tokens": 48, **kw})


def test_regex_choice_json_and_grammar(served):
    c = served.client()
    regex = r"(cat|dog)-[0-9]{2}"
    r = c.chat.completions.create(model=served.name, messages=MSG, temperature=0, max_tokens=16,
                                  extra_body={"structured_outputs": {"regex": regex}})
    assert re.fullmatch(regex, r.choices[0].message.content) and r.choices[0].finish_reason == "stop"
    choices = ["alpha", "beta", "gamma delta"]
    r = c.chat.completions.create(model=served.name, messages=MSG, temperature=0.9, seed=3, max_tokens=16, n=3,
                                  extra_body={"structured_outputs": {"choice": choices}})
    assert all(ch.message.content in choices for ch in r.choices)
    # completions take the same fields
    r = c.completions.create(model=served.name, prompt="Pick:", temperature=0, max_tokens=16,
                             extra_body={"structured_outputs": {"regex": r"[A-Z][a-z]{2,4}!"}})
    assert re.fullmatch(r"[A-Z][a-z]{2,4}!", r.choices[0].text)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"]}
    r = c.completions.create(model=served.name, prompt="JSON:", temperature=0, max_tokens=24,
                             extra_body={"structured_outputs": {"json": schema}})
    assert 1 <= json.loads(r.choices[0].text)["n"] <= 9
    r = c.chat.completions.create(model=served.name, messages=MSG, temperature=0, max_tokens=24,
                                  response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    ebnf = 'root ::= "x" ("+" "x"){0,3} "=" [0-9]'          # bounded: a random model may repeat forever
    r = c.chat.completions.create(model=served.name, messages=MSG, temperature=0, max_tokens=16,
                                  extra_body={"structured_outputs": {"grammar": ebnf}})
    assert re.fullmatch(r"x(\+x){0,3}=[0-9]", r.choices[0].message.content)
    # streamed constrained output equals the non-streamed one (greedy)
    kw = dict(model=served.name, messages=MSG, temperature=0, max_tokens=16,
              extra_body={"structured_outputs": {"regex": regex}})
    whole = c.chat.completions.create(**kw).choices[0].message.content
    assert "".join(x.choices[0].delta.content or "" for x in c.chat.completions.create(stream=True, **kw)
                   if x.choices) == whole


def test_reasoning_is_split_from_content(served):
    c = served.client()
    kw = dict(model=served.name, messages=MSG, temperature=0, max_tokens=24,
              extra_body={"structured_outputs": {"regex": r"<think>[a-z]{3,6}</think>[a-z]{2,5}"}})
    msg = c.chat.completions.create(**kw).choices[0].message
    reasoning = msg.model_extra["reasoning"]
    assert re.fullmatch("[a-z]{3,6}", reasoning) and re.fullmatch("[a-z]{2,5}", msg.content), msg
    parts = {"reasoning": "", "content": ""}
    for x in c.chat.completions.create(stream=True, **kw):
        for ch in x.choices:
            parts["reasoning"] += (ch.delta.model_extra or {}).get("reasoning") or ""
            parts["content"] += ch.delta.content or ""
    assert parts == {"reasoning": reasoning, "content": msg.content}


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "nonsense"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}},
     "response_format.json_schema.schema", "valid dictionary"),
    ({"structured_outputs": {"regex": "(?<=a)b"}}, "structured_outputs.regex", "Lookbehind"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar", "undefined_rule"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "at least 1"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "not both"),
])
def test_bad_grammars_are_400_and_the_server_stays_healthy(served, body, param, words):
    err = assert_openai_error(_chat(served, **body), 400)
    assert err["param"] == param and words in err["message"], err
    assert _chat(served, structured_outputs={"choice": ["ok"]}).json()["choices"][0]["message"]["content"] == "ok"
    assert httpx.get(f"{served.url}/health").status_code == 200
