"""The OpenAI-compatible HTTP bodies, as pydantic models: requests (validated strictly: a string is never a number)
and responses (what the official `openai` client parses). Field names and defaults follow OpenAI's API; the
vLLM extras (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `structured_outputs`) are
accepted as vLLM accepts them; `response_format`, `tools` and `tool_choice` as OpenAI's. Unknown fields are refused,
so a feature raymoe lacks is a 400, never ignored.
This module only describes shapes; it never calls the engine.
"""
from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

SInt = Annotated[int, Strict()]
SFloat = Annotated[float, Strict()]      # strict floats still take JSON integers
SStr = Annotated[str, Strict()]
SBool = Annotated[bool, Strict()]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_Request):
    """Fields shared by chat and text completions."""
    model: SStr
    n: SInt = Field(1, ge=1, le=16)
    temperature: SFloat | None = Field(None, ge=0, le=2)
    top_p: SFloat | None = Field(None, gt=0, le=1)
    top_k: SInt | None = Field(None, ge=-1)          # vLLM: -1 or 0 is off
    min_p: SFloat | None = Field(None, ge=0, le=1)
    seed: SInt | None = None
    stop: SStr | list[SStr] | None = Field(None, max_length=16)
    stop_token_ids: list[SInt] | None = Field(None, max_length=64)
    presence_penalty: SFloat | None = Field(None, ge=-2, le=2)
    frequency_penalty: SFloat | None = Field(None, ge=-2, le=2)
    repetition_penalty: SFloat | None = Field(None, ge=0.01, le=10)   # tinier ones overflow the logits
    ignore_eos: SBool = False
    stream: SBool = False
    stream_options: StreamOptions | None = None
    user: SStr | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None


class StreamOptions(_Request):
    include_usage: SBool = False


class JSONSchemaFormat(_Request):
    name: SStr = Field("response", max_length=64)
    description: SStr | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: SBool | None = None


class ResponseFormat(_Request):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type 'json_schema' needs 'json_schema': {'name', 'schema'}")
        return self


class StructuredOutputs(_Request):
    """vLLM's structured_outputs: exactly one of a JSON schema, a regex, a list of choices, an EBNF grammar, or any
    JSON object."""
    json_: dict | SStr | None = Field(None, alias="json")
    regex: SStr | None = None
    choice: list[SStr] | None = Field(None, min_length=1)
    grammar: SStr | None = None
    json_object: SBool | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of 'json', 'regex', 'choice', 'grammar', "
                             "'json_object'")
        return self


class TextPart(_Request):
    type: Literal["text"]
    text: SStr


class FunctionCall(_Request):
    name: SStr
    arguments: SStr                       # JSON text, as OpenAI sends it


class ToolCallIn(_Request):
    """A tool call of an earlier assistant turn, sent back with the conversation."""
    id: SStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: SStr | list[TextPart] | None = Field(None, validate_default=True)
    name: SStr | None = None
    tool_calls: list[ToolCallIn] | None = None          # assistant turns that called tools
    tool_call_id: SStr | None = None                    # tool results
    reasoning: SStr | None = None                       # an earlier turn's reasoning (not rendered)

    @field_validator("content")
    @classmethod
    def _content(cls, v, info):
        if v is None and info.data.get("role") != "assistant":   # an assistant turn may hold only tool calls
            raise ValueError(f"a {info.data.get('role')!r} message needs 'content'")
        return v

    @model_validator(mode="after")
    def _calls(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry 'tool_calls'")
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs 'content' or 'tool_calls'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDef(_Request):
    name: SStr = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: SStr | None = None
    parameters: dict | None = None
    strict: SBool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: SStr


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: SBool = True
    max_tokens: SInt | None = Field(None, ge=1)
    max_completion_tokens: SInt | None = Field(None, ge=1)
    logprobs: SBool = False
    top_logprobs: SInt | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: SStr | list[SInt] | list[SStr] | list[list[SInt]]
    max_tokens: SInt | None = Field(16, ge=1)
    echo: SBool = False
    logprobs: SInt | None = Field(None, ge=0, le=20)


class LoadLoraAdapterRequest(_Request):
    """vLLM's POST /v1/load_lora_adapter body. lora_path: inside the server's lora_root (relative to it, or an
    absolute path / URL under it); omitted: <lora_root>/<lora_name>."""
    lora_name: SStr
    lora_path: SStr | None = None
    load_inplace: SBool = False          # replace an adapter already loaded under this name


class UnloadLoraAdapterRequest(_Request):
    """vLLM's POST /v1/unload_lora_adapter body."""
    lora_name: SStr
    lora_int_id: SInt | None = None      # accepted as vLLM does; names are what raymoe goes by


class TokenizeRequest(_Request):
    model: SStr | None = None
    prompt: SStr | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: SBool = True
    add_special_tokens: SBool = True


class DetokenizeRequest(_Request):
    model: SStr | None = None
    tokens: list[SInt]


# ---- responses -------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


def _now() -> int:
    return int(time.time())


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "raymoe"
    root: str | None = None
    parent: str | None = None            # an adapter's base model (vLLM's field); None for the base itself
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


_Sampling.model_rebuild()
ChatMessage.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
