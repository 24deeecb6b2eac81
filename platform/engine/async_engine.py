"""The asyncio fronts of the engine, for servers: `EngineClient` (what a server may ask of an engine) and
`AsyncEngine` (the engine stepped in a thread of this process).

`stream` is an async iterator over batches of a request's deltas; leaving it early (cancellation, client gone)
aborts the request. Deltas reach each caller's event loop with one `call_soon_threadsafe` per loop per engine step,
whatever the number of streams. Adapters, expert load and stats are asked of the client, never of the engine
object behind it, so a server runs unchanged over `AsyncEngine` or over `EngineProcess` (the engine in a child
process, `engine_process.py`). In `AsyncEngine` a constrained request's grammar is compiled at admission in a worker
thread (once per distinct grammar; cached after), never in a step.
"""
from __future__ import annotations

import abc
import asyncio
import itertools
from collections.abc import AsyncIterator

from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine.llm_engine import Delta, LLMEngine
from raymoe.platform.engine.step_loop import StepLoop

_ids = itertools.count()


class EngineDead(RuntimeError):
    """The engine behind a client has stopped (its process exited): nothing more will come from it."""


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in puts:
        q.put_nowait(item)


class EngineClient(abc.ABC):
    """Streams of requests over some engine: subclasses say how a request reaches it (`_submit`) and how its deltas
    come back (they call `_deliver` from any thread)."""

    def __init__(self) -> None:
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats: dict = {}

    @abc.abstractmethod
    async def _submit(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        raise NotImplementedError

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[list[Delta]]:
        """Stream one request (all n choices) as batches: each a non-empty list of every delta that arrived since
        the last one was taken. A refused request raises RequestError (at once, or at the first batch)."""
        rid = request_id or f"req-{next(_ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        done = 0
        try:
            await self._submit(rid, prompt_ids, params)
            while done < params.n:
                batch = [await q.get()]
                while not q.empty():
                    batch.append(q.get_nowait())
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                    done += item.finished
                yield batch
        finally:
            self._streams.pop(rid, None)
            if done < params.n:
                self.abort(rid)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[Delta]:
        """Stream deltas of one request (all n choices), one at a time."""
        async for batch in self.stream(prompt_ids, params, request_id):
            for d in batch:
                yield d

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        """Hand (request id, delta or error) pairs to their callers: one call_soon_threadsafe per event loop."""
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, item in items:
            target = self._streams.get(rid)
            if target is not None:
                per_loop.setdefault(target[0], []).append((target[1], item))
        for loop, puts in per_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:                      # that caller's loop has closed: nobody to tell
                pass

    def stats(self) -> dict:
        """The engine's gauges as of its last step (LLMEngine.stats)."""
        return dict(self._stats)

    @property
    def open_requests(self) -> int:
        """Requests whose streams are open (running, waiting, or not yet taken in by the engine)."""
        return len(self._streams)

    # what subclasses provide besides _submit
    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        raise NotImplementedError

    @abc.abstractmethod
    async def adapters(self) -> list[str]:
        raise NotImplementedError

    @abc.abstractmethod
    async def load_adapter(self, name: str, path: str) -> dict:
        raise NotImplementedError

    @abc.abstractmethod
    async def unload_adapter(self, name: str) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    async def expert_load(self) -> dict[int, list[int]]:
        raise NotImplementedError

    @abc.abstractmethod
    def shutdown(self) -> None:
        raise NotImplementedError


class AsyncEngine(EngineClient):
    """The engine in this process: a StepLoop thread (steps are CPU/GPU bound and release the GIL inside torch)."""

    def __init__(self, cfg: EngineConfig | None = None, engine: LLMEngine | None = None, **kw) -> None:
        super().__init__()
        self.engine = engine if engine is not None else LLMEngine(cfg, **kw)
        self._loop = StepLoop(self.engine, self._publish, wanted=lambda rid: rid in self._streams)
        self._stats = self._loop.stats

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _publish(self, items: list[tuple[str, object]], stats: dict | None) -> None:
        if stats is not None:
            self._stats = stats
        if items:
            self._deliver(items)

    async def _submit(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_ids, params)
        grammar = None
        if params.grammar is not None:
            grammar = (self.engine.cached_grammar(params.grammar) or
                       await asyncio.to_thread(self.engine.compile_grammar, params.grammar))
        self._loop.add(rid, prompt_ids, params, grammar)

    def abort(self, request_id: str) -> None:
        self._loop.abort(request_id)

    @property
    def alive(self) -> bool:
        return self._loop.alive

    async def adapters(self) -> list[str]:
        return self.engine.adapters()

    async def load_adapter(self, name: str, path: str) -> dict:
        return await asyncio.to_thread(self.engine.load_adapter, name, path)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self.engine.unload_adapter, name)

    async def expert_load(self) -> dict[int, list[int]]:
        return await asyncio.to_thread(self.engine.expert_load)

    def shutdown(self) -> None:
        self._loop.stop()
        self.engine.close()
