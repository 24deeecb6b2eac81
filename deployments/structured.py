"""What constrains a request's output: OpenAI's `response_format`, vLLM's `structured_outputs`, and a chat request's
`tool_choice` (`required` or a named function) turned into one GrammarSpec for the engine.

Each spec is canonical text (compact JSON for schemas), so equal constraints share one compiled grammar in the
engine's cache. Tool calls use xgrammar's DeepSeek-R1 structural tag (DeepSeek-V3's tool-call format, which R1
shares), built from the tools' parameter schemas so the arguments always parse, with the markers bound to their
single tokens (spelled out byte by byte, a marker costs dozens of tokens). Only checks that need no
compiling happen here (shapes, unknown tool names, conflicting fields: a 400 naming the field); whether xgrammar
takes a schema or regex is decided where it compiles, and a refusal comes back as a 400 too. No HTTP, no Ray.
"""
from __future__ import annotations

import json

import xgrammar as xgr
from xgrammar.builtin_structural_tag import get_deepseek_r1_structural_tag

from raymoe.deployments.errors import APIError
from raymoe.deployments.protocol import ChatCompletionRequest, CompletionRequest, NamedToolChoice
from raymoe.platform.checkpoint.tokenizer import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END,
                                                  TOOL_SEP)
from raymoe.platform.config import GrammarSpec

TOOL_FORMAT = "raymoe_deepseek_v3"   # xgrammar's DeepSeek-R1 tag, its markers declared as single tokens


@xgr.register_model_structural_tag(TOOL_FORMAT, marker_tokens=[TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN,
                                                               TOOL_CALL_END, TOOL_SEP])
def _deepseek_v3_tag(*args, **kw):
    return get_deepseek_r1_structural_tag(*args, **kw)


def _compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _schema(value, field: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise APIError(400, f"invalid JSON schema in {field!r}: not JSON ({e.msg})", field) from None
    if not isinstance(value, dict):
        raise APIError(400, f"invalid JSON schema in {field!r}: a schema is a JSON object", field)
    return _compact(value)


def output_grammar(req: ChatCompletionRequest | CompletionRequest) -> tuple[GrammarSpec | None, str | None]:
    """(the grammar of `response_format` or `structured_outputs`, the field it came from); (None, None) if free."""
    rf, so = req.response_format, req.structured_outputs
    if rf is not None and rf.type != "text" and so is not None:
        raise APIError(400, "give 'response_format' or 'structured_outputs', not both", "structured_outputs")
    if rf is not None and rf.type == "json_object":
        return GrammarSpec(kind="json_object"), "response_format"
    if rf is not None and rf.type == "json_schema":
        js = rf.json_schema
        return (GrammarSpec(kind="json_schema", value=_schema(js.schema_, "response_format.json_schema.schema"),
                            strict=bool(js.strict)), "response_format")
    if so is None:
        return None, None
    if so.json_ is not None:
        return GrammarSpec(kind="json_schema", value=_schema(so.json_, "structured_outputs.json"),
                           strict=False), "structured_outputs.json"
    if so.regex is not None:
        return GrammarSpec(kind="regex", value=so.regex), "structured_outputs.regex"
    if so.choice is not None:
        return GrammarSpec(kind="choice", value=_compact(so.choice)), "structured_outputs.choice"
    if so.grammar is not None:
        return GrammarSpec(kind="ebnf", value=so.grammar), "structured_outputs.grammar"
    return GrammarSpec(kind="json_object"), "structured_outputs.json_object"


def tool_mode(req: ChatCompletionRequest) -> str:
    """'none' (no tools, or tool_choice none), 'auto', 'required' or 'named'."""
    if not req.tools:
        if req.tool_choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return "none"
    choice = req.tool_choice or "auto"
    if isinstance(choice, NamedToolChoice):
        names = [t.function.name for t in req.tools]
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not among "
                                f"'tools' ({', '.join(names)})", "tool_choice")
        return "named"
    return choice


def tool_grammar(req: ChatCompletionRequest, mode: str) -> GrammarSpec | None:
    """The structural tag that forces tool calls (`required`: one or more of the tools, or exactly one when
    parallel_tool_calls is false; `named`: that function), arguments constrained by each tool's schema."""
    if mode not in ("required", "named"):
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    for t in tools:
        if "parameters" in t["function"]:
            _schema(t["function"]["parameters"], f"tools.{t['function']['name']}.parameters")
    choice = req.tool_choice.model_dump() if mode == "named" else "required"
    try:
        # at most one whitespace character in a row inside the arguments (a model's runs of it never end the call)
        tag = xgr.get_model_structural_tag(TOOL_FORMAT, tools=tools, tool_choice=choice, reasoning="disabled",
                                           max_whitespace_cnt=1, parallel_tool_calls=req.parallel_tool_calls,
                                           token_markers=True)
    except Exception as e:                     # noqa: BLE001 (xgrammar's check of tools and tool_choice)
        raise APIError(400, f"invalid tools: {str(e).splitlines()[0]}", "tools") from None
    return GrammarSpec(kind="structural_tag", value=tag.model_dump_json())


def request_grammar(req: ChatCompletionRequest | CompletionRequest,
                    mode: str = "none") -> tuple[GrammarSpec | None, str | None]:
    """The one grammar of a request and the field it came from: forced tool calls, else the output format."""
    out, field = output_grammar(req)
    tools = tool_grammar(req, mode) if isinstance(req, ChatCompletionRequest) else None
    if tools is not None and out is not None:
        raise APIError(400, f"tool_choice {mode!r} forces tool calls; it cannot be combined with {field!r}",
                       "tool_choice")
    return (tools, "tool_choice") if tools is not None else (out, field)
