"""OpenAIIngress: the HTTP front (FastAPI under @serve.ingress), OpenAI- and vLLM-compatible.

It owns the routes, the API key and body-size guard, tokenization (chat template), the context check, dispatch to
the engine, SSE framing and request timing for /metrics. Two ways to reach the engine (ServeAppConfig.ingress):
- `separate`: a streaming handle to the ModelServer deployment. Capacity is Serve's: a model replica takes
  `max_ongoing_requests`, the handle queues up to `max_queued_requests`, and beyond that Serve's BackPressureError
  becomes a 429 with Retry-After at once. A model replica that dies is a 503 from here.
- `fused`: this replica owns the engine itself (a ModelServer object; the deployment is then the model one): one
  process hop less per token. A replica admits `max_ongoing_requests + max_queued_requests` generation requests
  (the engine batches what it can and queues the rest) and answers 429 with Retry-After past that.
Either way the ingress waits for a request's first delta before answering, so any refusal is an HTTP status, not
an error inside a 200 stream; a client that leaves mid-stream closes the engine stream, which aborts the request.
SSE framing is sse.py's.
"""

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from raymoe.deployments import errors, sse, translate
from raymoe.deployments.config import ServeAppConfig
from raymoe.deployments.errors import APIError, error_response
from raymoe.deployments.metrics import RequestMetrics
from raymoe.deployments.model import ModelServer
from raymoe.deployments.protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest,
                                         Completion, CompletionChoice, CompletionRequest, DetokenizeRequest,
                                         DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse)
from raymoe.platform.config import ModelConfig
from raymoe.platform.engine import RequestError

log = logging.getLogger(__name__)

app = FastAPI(title="raymoe", description="OpenAI-compatible API for DeepSeek-V3-class MoE models on Ray Serve",
              version="0.1.0")
errors.install(app)
OPEN_PATHS = ("/health",)


class Guard:
    """ASGI middleware: the optional API key (every path but /health) and the request body limit (413)."""

    def __init__(self, asgi) -> None:
        self.asgi = asgi

    async def __call__(self, scope, receive, send):
        cfg = getattr(scope.get("app"), "state", None)
        cfg = getattr(cfg, "guard", None)
        if scope["type"] != "http" or cfg is None:
            return await self.asgi(scope, receive, send)
        key, limit = cfg
        path = scope["path"][len(scope.get("root_path", "")):] if scope["path"].startswith(
            scope.get("root_path", "")) else scope["path"]
        headers = dict(scope.get("headers") or [])
        if key is not None and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            given = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, key):
                return await error_response(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                                            code="invalid_api_key")(scope, receive, send)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            too_big = error_response(413, f"the request body is larger than {limit} bytes",
                                     code="request_too_large")
            try:
                if int(headers.get(b"content-length", b"0")) > limit:
                    return await too_big(scope, receive, send)
            except ValueError:
                return await error_response(400, "invalid Content-Length header")(scope, receive, send)
            body, more = [], True
            size = 0
            while more:
                msg = await receive()
                if msg["type"] != "http.request":
                    return
                body.append(msg.get("body", b""))
                size += len(body[-1])
                if size > limit:
                    return await too_big(scope, receive, send)
                more = msg.get("more_body", False)
            replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

            async def receive_again():
                return replay.pop() if replay else await receive()
            return await self.asgi(scope, receive_again, send)
        return await self.asgi(scope, receive, send)


app.add_middleware(Guard)


def _cancel(gen) -> None:
    """Cancel a handle call (one that never reached a replica re-raises its refusal here: nothing to cancel), or
    close a local engine stream, which aborts its request."""
    if hasattr(gen, "aclose"):
        asyncio.ensure_future(gen.aclose())   # not running now (its consumer is here): closes at once
        return
    try:
        gen.cancel()
    except Exception:                          # noqa: BLE001
        pass


def _json(body) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")



async def _own_model_server(*args) -> ModelServer:
    """`ingress: fused`: the ModelServer class (not the deployment) run in this replica, so the engine is local."""
    cls = ModelServer.func_or_class
    server = cls.__new__(cls)
    await cls.__init__(server, *args)
    return server


async def _collect(stream, n: int) -> translate.Outputs:
    """A non-streamed request's choices, gathered from the replica's batches of deltas."""
    out = translate.Outputs(n)
    async for batch in stream:
        for d in batch:
            out.add(d)
    return out


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=4096)
@serve.ingress(app)
class OpenAIIngress:
    async def __init__(self, cfg: ServeAppConfig, model, metrics) -> None:
        from transformers import AutoTokenizer
        self.cfg = cfg
        self.name = cfg.model_name
        ecfg = cfg.engine_config()
        self.max_model_len = ecfg.max_model_len or ModelConfig.from_pretrained(cfg.model).max_context
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.tt = translate.TokenText(self.tokenizer)
        # fused (model is None): this replica owns the engine; separate: a streaming handle to ModelServer
        self.host = await _own_model_server(ecfg, metrics, cfg.metrics_interval_s) if model is None else None
        self.model = model.options(stream=True) if model is not None else None
        self.admit = cfg.max_ongoing_requests + cfg.max_queued_requests
        self.metrics = metrics
        self.buffer = RequestMetrics()
        key = cfg.api_key()
        app.state.guard = (None if key is None else key.encode(), cfg.max_request_bytes)
        self._flusher = asyncio.create_task(self._flush_loop())

    # ---- plain routes --------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.name, root=self.cfg.model, max_model_len=self.max_model_len)])

    @app.get("/metrics")
    async def prometheus(self) -> PlainTextResponse:
        await self._flush()
        text = await self.metrics.render.remote(self.name)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
        if req.messages is not None:
            if not req.messages:
                raise APIError(400, "'messages' is empty", "messages")
            ids = translate.chat_prompt_ids(self.tokenizer, req.messages)
        else:
            ids = list(self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids)
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids)

    @app.post("/detokenize")
    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(req.model)
        self._check_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))

    # ---- generation ----------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(self, req: ChatCompletionRequest) -> Response:
        self._check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
        ids = await self._encode(translate.chat_prompt_ids, req.messages, sum(len(m.text()) for m in req.messages))
        asked = req.max_completion_tokens or req.max_tokens
        translate.check_context(len(ids), asked, self.max_model_len, "messages")
        max_tokens = asked or min(self.cfg.default_max_tokens, self.max_model_len - len(ids))
        params = translate.sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self._start(ids, params, rid)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(sse.chat_events(stream, rid, self.name, req.n, usage, self.tt),
                                     media_type="text/event-stream")
        out = await _collect(stream, req.n)
        return _json(ChatCompletion(id=rid, model=self.name, usage=out.usage(), choices=[
            ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                       logprobs=translate.chat_logprobs(self.tt, c.logprobs) if req.logprobs else None)
            for i, c in enumerate(out.choices)]))

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> Response:
        self._check_model(req.model)
        size = len(req.prompt) if isinstance(req.prompt, str) else 0
        ids = await self._encode(translate.completion_prompt_ids, req.prompt, size)
        self._check_ids(ids, "prompt")
        translate.check_context(len(ids), req.max_tokens, self.max_model_len, "prompt")
        max_tokens = req.max_tokens or min(self.cfg.default_max_tokens, self.max_model_len - len(ids))
        params = translate.sampling_params(req, max_tokens, req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = await self._start(ids, params, rid)
        prefix = self.tokenizer.decode(ids, skip_special_tokens=True) if req.echo else ""
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(sse.completion_events(stream, rid, self.name, req, prefix, ids, usage, self.tt),
                                     media_type="text/event-stream")
        out = await _collect(stream, req.n)
        return _json(Completion(id=rid, model=self.name, usage=out.usage(), choices=[
            CompletionChoice(index=i, text=prefix + c.text, finish_reason=c.finish_reason,
                             logprobs=None if req.logprobs is None else translate.completion_logprobs(
                                 self.tt, c.logprobs, 0, ids if req.echo else None))
            for i, c in enumerate(out.choices)]))

    # ---- helpers -------------------------------------------------------------------------------------------------
    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"The model '{name}' does not exist (this server serves '{self.name}').", "model",
                           "model_not_found")

    def _check_ids(self, ids: list[int], field: str) -> None:
        vocab = len(self.tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", field)

    async def _encode(self, fn, arg, size: int) -> list[int]:
        if size > 20000:                       # a long prompt is tokenized off the event loop
            return await asyncio.to_thread(fn, self.tokenizer, arg)
        return fn(self.tokenizer, arg)

    async def _start(self, ids: list[int], params, rid: str) -> AsyncIterator:
        """Dispatch to a model replica and wait for its first output: refusals become HTTP errors here."""
        t0 = time.perf_counter()
        try:
            if self.host is None:
                gen = self.model.generate.remote(ids, params, rid)
            elif self.host.engine.open_requests >= self.admit:
                raise BackPressureError(num_queued_requests=self.admit, max_queued_requests=self.admit)
            else:
                gen = self.host.generate(ids, params, rid)
        except BackPressureError as e:           # fused: this replica has admitted all it may
            err = self._refusal(e)
            self.buffer.count(str(err.status), 1, "rejected")
            raise err from None
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = []
        except BaseException as e:
            _cancel(gen)
            err = self._refusal(e)
            if err is None:
                raise
            self.buffer.count(str(err.status), 1, "rejected")
            raise err from None
        return self._deltas(gen, first, t0, len(ids), params.n)

    def _refusal(self, e: BaseException) -> APIError | None:
        retry = {"Retry-After": str(self.cfg.retry_after_s)}
        if isinstance(e, BackPressureError):
            return APIError(429, "the server is at capacity and its queue is full; retry later", None,
                            "rate_limit_exceeded", retry)
        if isinstance(e, RequestError):         # raised in the replica: Ray wraps it; its own text is the cause's
            msg = str(getattr(e, "cause", None) or e).splitlines()[0]
            return APIError(400, msg, "max_tokens" if "max_tokens" in msg else None)
        if isinstance(e, (DeploymentUnavailableError, ActorDiedError, ActorUnavailableError, RayActorError)):
            return APIError(503, "no model replica is available right now; retry later", None,
                            "service_unavailable", retry)
        if isinstance(e, (asyncio.CancelledError, RequestCancelledError)):
            return None
        log.error("generation failed: %s", e)
        return APIError(500, f"generation failed ({type(e).__name__})")

    async def _deltas(self, gen, first: list, t0: float, prompt_len: int, n: int):
        """Yield the replica's batches of Deltas; time them for /metrics; cancel the replica's stream if the caller
        leaves."""
        m, last, tokens, done = self.buffer, None, 0, {}
        try:
            batch = first
            while True:
                now = time.perf_counter()
                new = sum(len(d.token_ids) for d in batch)
                if new:
                    if last is None:
                        m.hist("vllm:time_to_first_token_seconds", now - t0)
                        new -= 1
                    if new > 0 and last is not None:
                        m.hist("vllm:inter_token_latency_seconds", (now - last) / new, new)
                    last, tokens = now, tokens + sum(len(d.token_ids) for d in batch)
                for d in batch:
                    if d.finished:
                        done[d.index] = d
                if batch:
                    yield batch
                try:
                    batch = await gen.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as e:         # the replica died mid-request (503) or the engine failed (500)
                    err = self._refusal(e)
                    if err is None:
                        raise
                    raise err from None
        finally:
            if len(done) < n:
                _cancel(gen)
            m.count("vllm:prompt_tokens_total", prompt_len)
            m.count("vllm:generation_tokens_total", tokens)
            for d in done.values():
                m.count(d.finish_reason, 1, "finished")
                m.count("vllm:spec_decode_num_draft_tokens_total", d.spec_proposed)
                m.count("vllm:spec_decode_num_accepted_tokens_total", d.spec_accepted)
            if done:
                m.hist("vllm:e2e_request_latency_seconds", time.perf_counter() - t0)

    # ---- the engine, when fused ----------------------------------------------------------------------------------
    def check_health(self) -> None:
        if self.host is not None:
            self.host.check_health()

    def __del__(self) -> None:
        if getattr(self, "host", None) is not None:
            self.host.__del__()              # ModelServer's: stops its metrics reports and its engine
            self.host = None

    # ---- metrics -------------------------------------------------------------------------------------------------
    async def _flush(self) -> None:
        batch = self.buffer.drain()
        if batch is not None:
            await self.metrics.add.remote(batch)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.metrics_interval_s)
            try:
                await self._flush()
            except Exception as e:             # noqa: BLE001 (metrics never fail requests)
                log.warning("metrics flush failed: %s", e)
