"""OpenAIIngress: the HTTP front (FastAPI under @serve.ingress), OpenAI- and vLLM-compatible.

It owns the routes, the API key and body-size guard, tokenization (chat template, tools included), the context
check, the request's grammar (structured.py: response_format, structured_outputs, forced tool calls), dispatch to
the engine, SSE framing, splitting chat output into reasoning, content and tool calls (chat_output.py) and request
timing for /metrics. It never runs the model itself except in `fused` mode. Two ways to reach the engine
(ServeAppConfig.ingress):
- `separate`: a streaming handle to the ModelServer deployment. Capacity is Serve's: a model replica takes
  `max_ongoing_requests`, the handle queues up to `max_queued_requests`, and beyond that Serve's BackPressureError
  becomes a 429 with Retry-After at once. A model replica that dies is a 503 from here.
- `fused`: this replica owns the engine itself (a ModelServer object; the deployment is then the model one): one
  process hop less per token. A replica admits `max_ongoing_requests + max_queued_requests` generation requests
  (the engine batches what it can and queues the rest) and answers 429 with Retry-After past that.
Either way the ingress waits for a request's first delta before answering, so any refusal is an HTTP status, not
an error inside a 200 stream; a client that leaves mid-stream closes the engine stream, which aborts the request.
SSE framing is sse.py's.

LoRA adapters: `model` names the base (its served name) or an adapter (`<adapter>` or `<served name>:<adapter>`),
looked up in the registry (adapters.py: lora_modules, POST /v1/load_lora_adapter, folders under lora_root); an adapter
request goes to the model deployment with `multiplexed_model_id=<adapter>` so Serve routes it to a replica that holds
the adapter (fused: the replica that took the request loads it). POST /v1/load_lora_adapter loads the adapter on one
replica (a broken one is a 400 and the name is not registered); others load it on their first request for it (the
multiplexed loader). POST /v1/unload_lora_adapter forgets the name here (requests for it are 404 from then on) and
unloads it from the replica the router picks for it; other replicas drop it through their LRU. With several ingress
replicas, the names loaded or unloaded through the API are known to the ingress replica that took the call (folders
under lora_root and lora_modules are known to all).
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

from raymoe.deployments import chat_output, errors, sse, structured, translate
from raymoe.deployments.adapters import AdapterRef, AdapterRegistry, AdapterRoot, check_name, exists, valid_name
from raymoe.deployments.config import ServeAppConfig
from raymoe.deployments.errors import APIError, error_response
from raymoe.deployments.metrics import RequestMetrics
from raymoe.deployments.model import ModelServer
from raymoe.deployments.protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest,
                                         Completion, CompletionChoice, CompletionRequest, DetokenizeRequest,
                                         DetokenizeResponse, FunctionCallOut, LoadLoraAdapterRequest, ModelCard,
                                         ModelList, TokenizeRequest, TokenizeResponse, ToolCall,
                                         UnloadLoraAdapterRequest)
from raymoe.platform.checkpoint.tokenizer import THINK_BEGIN
from raymoe.platform.config import ModelConfig
from raymoe.platform.engine import EngineDead, RequestError
from raymoe.platform.engine.adapters import AdapterInvalid, AdapterNotFound

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


def _cause(e: BaseException) -> str:
    """The first line of an exception raised in a replica (Ray wraps it; the cause's own text)."""
    return str(getattr(e, "cause", None) or e).splitlines()[0]


def _json(body) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")



def _chat_choice(i: int, c: translate.Choice, shape: tuple[bool, bool, bool], logprobs) -> ChatChoice:
    """One non-streamed chat choice: its text split into reasoning, content and tool calls."""
    p = chat_output.parse(c.text, *shape, final=True)
    calls = [ToolCall(id=x.id, function=FunctionCallOut(name=x.name, arguments=x.arguments)) for x in p.calls
             if x.complete]                   # a call cut off by max_tokens is left out (finish_reason: length)
    finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
    return ChatChoice(index=i, message=AssistantMessage(content=None if calls and not p.content else p.content,
                                                       reasoning=p.reasoning, tool_calls=calls),
                      finish_reason=finish, logprobs=logprobs)


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
        preload = [AdapterRef(name=n, path=p) for n, p in cfg.lora_modules.items()]
        self.host = (await _own_model_server(ecfg, metrics, cfg.metrics_interval_s, preload, cfg.engine_process)
                     if model is None else None)
        self.model_handle = model
        self.model = model.options(stream=True) if model is not None else None
        self.admit = cfg.max_ongoing_requests + cfg.max_queued_requests
        self.adapters = AdapterRegistry(AdapterRoot(cfg.lora_root), cfg.lora_modules)
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
        refs = await asyncio.to_thread(self.adapters.listing)
        return ModelList(data=[ModelCard(id=self.name, root=self.cfg.model, max_model_len=self.max_model_len)] + [
            ModelCard(id=r.name, root=r.path, parent=self.name, max_model_len=self.max_model_len) for r in refs])

    # ---- LoRA adapters (vLLM's runtime API) ----------------------------------------------------------------------
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, req: LoadLoraAdapterRequest) -> PlainTextResponse:
        name = check_name(req.lora_name)
        if name == self.name:
            raise APIError(400, f"{name!r} is the base model's name", "lora_name", "invalid_lora_name")
        if name in self.adapters.loaded and not req.load_inplace:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                                "in place, set 'load_inplace' to True.", "lora_name", "lora_already_loaded")
        path = self.adapters.root.resolve(req.lora_path, name)
        if not await asyncio.to_thread(exists, path):
            raise APIError(400, f"no LoRA adapter at lora_path {req.lora_path or name!r} (a PEFT adapter folder "
                                "holds adapter_config.json and adapter_model.safetensors)", "lora_path",
                           "invalid_lora_path")
        ref = self.adapters.next_ref(name, path)
        try:
            if self.host is None:
                await self.model_handle.options(multiplexed_model_id=name).load_adapter.remote(ref)
            else:
                await self.host.load_adapter(ref)
        except BaseException as e:
            err = self._refusal(e, "lora_path")
            if err is None:
                raise
            raise err from None
        self.adapters.put(ref)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, req: UnloadLoraAdapterRequest) -> PlainTextResponse:
        name = check_name(req.lora_name)
        if await asyncio.to_thread(self.adapters.remove, name) is None:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "lora_not_found")
        try:
            if self.host is None:
                await self.model_handle.options(multiplexed_model_id=name).unload_adapter.remote(name)
            else:
                await self.host.unload_adapter(name)
        except Exception as e:                 # noqa: BLE001 (the name is gone here; replicas drop it by LRU)
            log.warning("unloading adapter %s from a replica failed: %s", name, e)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.get("/metrics")
    async def prometheus(self) -> PlainTextResponse:
        await self._flush()
        text = await self.metrics.render.remote(self.name)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        await self._adapter_of(req.model)
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
        await self._adapter_of(req.model)
        self._check_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))

    # ---- generation ----------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(self, req: ChatCompletionRequest) -> Response:
        adapter = await self._adapter_of(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
        mode = structured.tool_mode(req)
        grammar, field = structured.request_grammar(req, mode)
        ids = await self._encode(lambda tok, msgs: translate.chat_prompt_ids(tok, msgs, req.tools), req.messages,
                                 sum(len(m.text()) for m in req.messages))
        asked = req.max_completion_tokens or req.max_tokens
        translate.check_context(len(ids), asked, self.max_model_len, "messages")
        max_tokens = asked or min(self.cfg.default_max_tokens, self.max_model_len - len(ids))
        params = translate.sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                           grammar)
        # (reasoning split, output starts inside <think>, parse tool calls)
        shape = (self.cfg.reasoning, self.cfg.reasoning and self._ends_in_think(ids), mode != "none")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self._start(ids, params, rid, adapter, field)
        name = req.model if adapter is not None else self.name
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(sse.chat_events(stream, rid, name, req.n, usage, self.tt, shape),
                                     media_type="text/event-stream")
        out = await _collect(stream, req.n)
        return _json(ChatCompletion(id=rid, model=name, usage=out.usage(), choices=[
            _chat_choice(i, c, shape, translate.chat_logprobs(self.tt, c.logprobs) if req.logprobs else None)
            for i, c in enumerate(out.choices)]))

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> Response:
        adapter = await self._adapter_of(req.model)
        size = len(req.prompt) if isinstance(req.prompt, str) else 0
        ids = await self._encode(translate.completion_prompt_ids, req.prompt, size)
        self._check_ids(ids, "prompt")
        translate.check_context(len(ids), req.max_tokens, self.max_model_len, "prompt")
        max_tokens = req.max_tokens or min(self.cfg.default_max_tokens, self.max_model_len - len(ids))
        grammar, field = structured.request_grammar(req)
        params = translate.sampling_params(req, max_tokens, req.logprobs, grammar)
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = await self._start(ids, params, rid, adapter, field)
        name = req.model if adapter is not None else self.name
        prefix = self.tokenizer.decode(ids, skip_special_tokens=True) if req.echo else ""
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(sse.completion_events(stream, rid, name, req, prefix, ids, usage, self.tt),
                                     media_type="text/event-stream")
        out = await _collect(stream, req.n)
        return _json(Completion(id=rid, model=name, usage=out.usage(), choices=[
            CompletionChoice(index=i, text=prefix + c.text, finish_reason=c.finish_reason,
                             logprobs=None if req.logprobs is None else translate.completion_logprobs(
                                 self.tt, c.logprobs, 0, ids if req.echo else None))
            for i, c in enumerate(out.choices)]))

    # ---- helpers -------------------------------------------------------------------------------------------------
    async def _adapter_of(self, model: str | None) -> AdapterRef | None:
        """None for the base model; the adapter `model` names (`<adapter>` or `<base>:<adapter>`); else a 404."""
        if model is None or model == self.name:
            return None
        name = model.removeprefix(f"{self.name}:")
        ref = None
        if valid_name(name):
            ref = self.adapters.known.get(name) or await asyncio.to_thread(self.adapters.get, name)
        if ref is None:
            raise APIError(404, f"The model '{model}' does not exist (this server serves '{self.name}' and the LoRA "
                                "adapters GET /v1/models lists).", "model", "model_not_found")
        return ref

    def _check_ids(self, ids: list[int], field: str) -> None:
        vocab = len(self.tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", field)

    async def _encode(self, fn, arg, size: int) -> list[int]:
        if size > 20000:                       # a long prompt is tokenized off the event loop
            return await asyncio.to_thread(fn, self.tokenizer, arg)
        return fn(self.tokenizer, arg)

    def _ends_in_think(self, ids: list[int]) -> bool:
        return self.tokenizer.decode(ids[-4:], skip_special_tokens=False).rstrip().endswith(THINK_BEGIN)

    async def _start(self, ids: list[int], params, rid: str, adapter: AdapterRef | None = None,
                     grammar_field: str | None = None) -> AsyncIterator:
        """Dispatch to a model replica (for an adapter: one holding it, if any) and wait for its first output:
        refusals become HTTP errors here (a grammar the replica cannot compile is a 400 naming `grammar_field`)."""
        t0 = time.perf_counter()
        if adapter is not None:
            params = params.model_copy(update={"adapter": adapter.name})
        try:
            if self.host is None and adapter is None:
                gen = self.model.generate.remote(ids, params, rid)
            elif self.host is None:
                gen = self.model.options(multiplexed_model_id=adapter.name).generate.remote(ids, params, rid,
                                                                                           adapter)
            elif self.host.engine.open_requests >= self.admit:
                raise BackPressureError(num_queued_requests=self.admit, max_queued_requests=self.admit)
            else:
                gen = self.host.generate(ids, params, rid, adapter)
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
            if (err.status == 400 and grammar_field and isinstance(e, RequestError)
                    and err.message.startswith("invalid ")):
                err.param = grammar_field
                if grammar_field == "tool_choice":
                    err.message = err.message.replace("invalid structural tag", "invalid tool parameter schema")
            self.buffer.count(str(err.status), 1, "rejected")
            raise err from None
        return self._deltas(gen, first, t0, len(ids), params.n)

    def _refusal(self, e: BaseException, adapter_param: str = "model") -> APIError | None:
        retry = {"Retry-After": str(self.cfg.retry_after_s)}
        if isinstance(e, AdapterNotFound):     # the engine's: raised in the replica, wrapped by Ray
            return APIError(404, _cause(e), "model", "model_not_found")
        if isinstance(e, AdapterInvalid):
            return APIError(400, _cause(e), adapter_param, "invalid_lora_adapter")
        if isinstance(e, BackPressureError):
            return APIError(429, "the server is at capacity and its queue is full; retry later", None,
                            "rate_limit_exceeded", retry)
        if isinstance(e, RequestError):         # raised in the replica: Ray wraps it; its own text is the cause's
            msg = _cause(e)
            return APIError(400, msg, "max_tokens" if "max_tokens" in msg else None)
        if isinstance(e, (DeploymentUnavailableError, ActorDiedError, ActorUnavailableError, RayActorError,
                          EngineDead)):              # EngineDead: the replica's engine process is gone
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
