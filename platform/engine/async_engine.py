"""AsyncEngine: the asyncio front of LLMEngine, for servers.

The engine runs in one background thread (steps are CPU/GPU bound and release the GIL inside torch); requests
and aborts reach it through an inbox, deltas come back to each caller's event loop. `generate` is an async
iterator of deltas; leaving it early (cancellation, client gone) aborts the request. A constrained request's
grammar is compiled at admission, in a worker thread (once per distinct grammar; cached after), never in a step. A
failing step fails the requests in it and the engine keeps serving the next ones.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator

from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine.llm_engine import Delta, LLMEngine

log = logging.getLogger(__name__)
_ids = itertools.count()


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in puts:
        q.put_nowait(item)


class AsyncEngine:
    def __init__(self, cfg: EngineConfig | None = None, engine: LLMEngine | None = None, **kw) -> None:
        self.engine = engine if engine is not None else LLMEngine(cfg, **kw)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._stats: dict = self.engine.stats()
        self._thread = threading.Thread(target=self._loop, name="raymoe-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[list[Delta]]:
        """Stream one request (all n choices) as batches: each a non-empty list of every delta that arrived since
        the last one was taken. Raises RequestError at once for a bad request."""
        rid = request_id or f"req-{next(_ids)}"
        self.engine.validate(prompt_ids, params)
        grammar = None
        if params.grammar is not None:
            grammar = (self.engine.cached_grammar(params.grammar) or
                       await asyncio.to_thread(self.engine.compile_grammar, params.grammar))
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (loop, q)
        self._inbox.put(("add", rid, prompt_ids, params, grammar))
        self._wake.set()
        done = 0
        try:
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
        """Stream deltas of one request (all n choices), one at a time. Raises RequestError at once for a bad
        request."""
        async for batch in self.stream(prompt_ids, params, request_id):
            for d in batch:
                yield d

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict:
        return dict(self._stats)

    @property
    def open_requests(self) -> int:
        """Requests whose streams are open (running, waiting, or not yet taken in by the engine thread)."""
        return len(self._streams)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.close()

    # ---- the engine thread ---------------------------------------------------------------------------------------
    def _send(self, items: list[tuple[str, object]]) -> None:
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

    def _loop(self) -> None:
        eng = self.engine
        while not self._stop:
            while True:
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if msg[0] == "add":
                    _, rid, prompt, params, grammar = msg
                    if rid not in self._streams:       # cancelled before it started
                        continue
                    try:
                        eng.add_request(rid, prompt, params, grammar)
                    except Exception as e:            # noqa: BLE001 (reported to the caller)
                        self._send([(rid, e)])
                else:
                    eng.abort(msg[1])
            if not eng.has_unfinished():
                self._stats = eng.stats()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                deltas = eng.step()
            except Exception as e:                    # noqa: BLE001 (fail the batch, keep serving)
                log.exception("engine step failed; failing its requests")
                failed = list(eng.requests)
                for rid in failed:
                    eng.abort(rid)
                self._send([(rid, RuntimeError(f"engine step failed: {e}")) for rid in failed])
                continue
            self._send([(d.request_id, d) for d in deltas])
            self._stats = eng.stats()
