"""A chat completion's generated text split into reasoning, content and tool calls, whole or as streamed deltas.

Reasoning is what a thinking model (DeepSeek-R1's kind) writes between `<think>` and `</think>`: the output is in
reasoning from its start when the prompt ends with `<think>` or the text opens with it. Tool calls are DeepSeek-V3's
markers: `<｜tool▁calls▁begin｜>`, then per call `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS
\\n```<｜tool▁call▁end｜>` (calls separated by a newline), then `<｜tool▁calls▁end｜>`; the text before them is content.
`ChatOutput` re-reads the whole text so far on every update (short texts; no state machine to drift) and returns
only what is new, holding back a tail that may be the start of a marker. No HTTP, no engine.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from raymoe.platform.checkpoint.tokenizer import (THINK_BEGIN, THINK_END, TOOL_CALL_BEGIN, TOOL_CALL_END,
                                                  TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP)

ARGS_BEGIN, ARGS_END = "\n```json\n", "\n```" + TOOL_CALL_END


def _held(text: str, marker: str) -> int:
    """Length of the longest tail of text that is a proper start of marker (held back while streaming)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class Call:
    name: str
    arguments: str
    complete: bool
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class Parsed:
    reasoning: str | None
    content: str
    calls: list[Call]


def parse(text: str, reasoning: bool, in_think: bool, tools: bool, final: bool) -> Parsed:
    """Split text; when not final, a tail that may begin a marker is left out."""
    think = None
    if reasoning and not in_think and not final and THINK_BEGIN.startswith(text.lstrip()):
        return Parsed(None, "", [])               # may still open with <think>
    if reasoning and (in_think or text.lstrip().startswith(THINK_BEGIN)):
        body = text.lstrip()[len(THINK_BEGIN):] if text.lstrip().startswith(THINK_BEGIN) else text
        if THINK_END in body:
            think, text = body.split(THINK_END, 1)
        else:
            return Parsed(body if final else body[:len(body) - _held(body, THINK_END)], "", [])
    if not tools or TOOL_CALLS_BEGIN not in text:
        hold = 0 if final or not tools else _held(text, TOOL_CALLS_BEGIN)
        return Parsed(think, text[:len(text) - hold], [])
    content, rest = text.split(TOOL_CALLS_BEGIN, 1)
    rest = rest.split(TOOL_CALLS_END, 1)[0]
    calls = []
    for part in rest.split(TOOL_CALL_BEGIN)[1:]:
        if TOOL_SEP not in part:
            break
        head = part.split(TOOL_SEP, 1)[1]
        if ARGS_BEGIN not in head:
            break                                 # the name is not complete yet
        name, args = head.split(ARGS_BEGIN, 1)
        done = ARGS_END in args
        if done:
            args = args.split(ARGS_END, 1)[0]
        elif not final:
            args = args[:len(args) - _held(args, ARGS_END)]
        calls.append(Call(name.strip(), args, done))
    return Parsed(think, content, calls)


class ChatOutput:
    """One choice's text, fed as it grows; `update` returns the delta fields new since the last call."""

    def __init__(self, reasoning: bool, in_think: bool, tools: bool) -> None:
        self.flags = (reasoning, in_think, tools)
        self.sent_reasoning = self.sent_content = 0
        self.sent_args: list[int] = []
        self.ids: list[str] = []

    def update(self, text: str, final: bool) -> dict:
        """{"reasoning": str, "content": str, "tool_calls": [ {index, id?, type?, function: {name?, arguments}} ]}
        holding only what is new (keys with nothing new are left out)."""
        p = parse(text, *self.flags, final=final)
        out: dict = {}
        if p.reasoning and len(p.reasoning) > self.sent_reasoning:
            out["reasoning"] = p.reasoning[self.sent_reasoning:]
            self.sent_reasoning = len(p.reasoning)
        if len(p.content) > self.sent_content:
            out["content"] = p.content[self.sent_content:]
            self.sent_content = len(p.content)
        calls = []
        for i, c in enumerate(p.calls):
            if i == len(self.sent_args):
                self.sent_args.append(0)
                self.ids.append(c.id)
                calls.append({"index": i, "id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}})
            elif len(c.arguments) > self.sent_args[i]:
                calls.append({"index": i, "function": {"arguments": c.arguments[self.sent_args[i]:]}})
            else:
                continue
            self.sent_args[i] = len(c.arguments)
        if calls:
            out["tool_calls"] = calls
        return out

    @property
    def called(self) -> bool:
        return bool(self.ids)
