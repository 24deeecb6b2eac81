"""Between OpenAI bodies and the engine: prompts to token ids (chat template), request fields to SamplingParams
(with the context limit checked), and engine deltas back to OpenAI choices, chunks and logprobs.

Pure functions and small accumulators over a tokenizer; no HTTP, no Ray. Errors are APIError(400) naming the field.
"""
from __future__ import annotations

from functools import lru_cache

from pydantic import ValidationError

from raymoe.deployments.errors import APIError
from raymoe.deployments.protocol import (ChatCompletionRequest, ChatMessage, ChoiceLogprobs, CompletionLogprobs,
                                         CompletionRequest, TokenLogprob, Tool, TopLogprob, Usage)
from raymoe.platform.config import GrammarSpec, SamplingParams
from raymoe.platform.engine import Delta


class TokenText:
    """Token id -> its text (what logprobs show), cached."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.text = lru_cache(maxsize=65536)(lambda t: tokenizer.decode([t], skip_special_tokens=False))

    def top(self, t: int, lp: float) -> TopLogprob:
        s = self.text(t)
        return TopLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8")))


def _message(m: ChatMessage) -> dict:
    d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        d["content"] = m.text() or None
        d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    return d


def chat_prompt_ids(tokenizer, messages: list[ChatMessage], tools: list[Tool] | None = None) -> list[int]:
    """The chat template over the messages (tool calls and tool results included) and the tools' descriptions."""
    msgs = [_message(m) for m in messages]
    kw = {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else {}
    try:
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True, **kw)
    except Exception as e:                     # noqa: BLE001 (a template error is the request's fault)
        raise APIError(400, f"the chat template refused the messages: {str(e).splitlines()[0]}", "messages")
    return list(out["input_ids"])


def completion_prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise APIError(400, "batched prompts are not supported: send one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(tokenizer(prompt).input_ids)
    return list(prompt)


def check_context(prompt_len: int, max_tokens: int | None, limit: int, where: str) -> None:
    """The context limit as vLLM words it: a 400 naming the limit."""
    if prompt_len >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {where} has "
                            f"{prompt_len} tokens, leaving none for the completion.", where,
                       "context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {where}, {max_tokens} in the "
                            f"completion). Please reduce the length of the {where} or the completion.",
                       "max_tokens", "context_length_exceeded")


SAMPLING_EPS = 1e-5      # as vLLM: a temperature below this is greedy (dividing logits by it would overflow)
MIN_TOP_P = 1e-6         # a top_p that rounds to 0 in the sampler's fp32 (< ~1e-45) drops every token (NaN probs);
                         # any top_p this small keeps only the most likely token anyway


def sampling_params(req: ChatCompletionRequest | CompletionRequest, max_tokens: int,
                    logprobs: int | None, grammar: GrammarSpec | None = None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else 0.0 if req.temperature < SAMPLING_EPS else req.temperature,
            top_p=1.0 if req.top_p is None else max(req.top_p, MIN_TOP_P), top_k=max(0, req.top_k or 0),
            min_p=req.min_p or 0.0,
            seed=req.seed, stop=stop, stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0, logprobs=logprobs, grammar=grammar)
    except ValidationError as e:               # the HTTP models check the same bounds; this is a backstop
        err = e.errors()[0]
        field = ".".join(map(str, err["loc"]))
        raise APIError(400, f"invalid value for {field!r}: {str(err['msg']).removeprefix('Value error, ')}", field)


def chat_logprobs(tt: TokenText, lps: list[dict] | None) -> ChoiceLogprobs | None:
    if not lps:
        return None
    return ChoiceLogprobs(content=[TokenLogprob(**tt.top(lp["token"], lp["logprob"]).model_dump(),
                                                top_logprobs=[tt.top(t, v) for t, v in lp["top"]]) for lp in lps])


class Choice:
    """One choice's output so far (for non-streamed answers and usage)."""

    def __init__(self) -> None:
        self.text, self.token_ids, self.logprobs = "", [], []
        self.finish_reason: str | None = None
        self.completion_tokens = 0


class Outputs:
    """All choices of one request, fed with the engine's deltas."""

    def __init__(self, n: int) -> None:
        self.choices = [Choice() for _ in range(n)]
        self.prompt_tokens = 0
        self.spec = [(0, 0)] * n

    def add(self, d: Delta) -> None:
        c = self.choices[d.index]
        c.text += d.text
        c.token_ids += d.token_ids
        c.logprobs += d.logprobs or []
        c.finish_reason = d.finish_reason
        c.completion_tokens = d.completion_tokens
        self.prompt_tokens = d.prompt_tokens
        self.spec[d.index] = (d.spec_proposed, d.spec_accepted)

    def usage(self) -> Usage:
        done = sum(c.completion_tokens for c in self.choices)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=done, total_tokens=self.prompt_tokens + done)


def completion_logprobs(tt: TokenText, lps: list[dict], start_offset: int,
                        prompt_ids: list[int] | None = None) -> CompletionLogprobs:
    """OpenAI's legacy logprobs; echoed prompt tokens carry null (the engine scores no prompt tokens)."""
    out = CompletionLogprobs()
    off = start_offset
    for t in prompt_ids or []:
        s = tt.text(t)
        out.tokens.append(s)
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
        out.text_offset.append(off)
        off += len(s)
    for lp in lps:
        s = tt.text(lp["token"])
        out.tokens.append(s)
        out.token_logprobs.append(lp["logprob"])
        out.top_logprobs.append({tt.text(t): v for t, v in lp["top"]})
        out.text_offset.append(off)
        off += len(s)
    return out
