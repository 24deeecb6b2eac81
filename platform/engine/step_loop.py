"""StepLoop: one LLMEngine stepped in a thread of its own, fed through an inbox.

Requests and aborts are queued from any thread; the loop takes them in between steps, steps while there is work
and hands each step's `(request id, Delta or exception)` pairs, with the engine's stats, to one `publish` callback.
That callback is the only way out: `AsyncEngine` passes one that wakes its callers' event loops, the engine process
(`engine_process.py`) one that writes to its socket. A failing step fails the requests in it; the loop goes on. It
never compiles grammars (callers compile at admission) and never touches asyncio.

The stats (`LLMEngine.stats()`: queues, KV usage, adapter names) are gauges read for metrics and the adapter check,
so a busy loop takes them after its first step and then at most every STATS_EVERY_S, not after every step; it
publishes None in between ("as before"), and fresh ones whenever it goes idle.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from raymoe.platform.config import SamplingParams
from raymoe.platform.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

Publish = Callable[[list[tuple[str, object]], dict | None], None]    # stats None: unchanged since the last
STATS_EVERY_S = 0.1


class StepLoop:
    def __init__(self, engine: LLMEngine, publish: Publish, wanted: Callable[[str], bool] = lambda rid: True) -> None:
        # wanted(rid): False for a request whose caller left before the loop took it in (then it is dropped)
        self.engine, self._publish, self._wanted = engine, publish, wanted
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self.stats: dict = engine.stats()
        self._stats_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="raymoe-engine", daemon=True)
        self._thread.start()

    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams, grammar=None) -> None:
        self._inbox.put(("add", rid, prompt_ids, params, grammar))
        self._wake.set()

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _take_inbox(self) -> None:
        eng = self.engine
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "abort":
                eng.abort(msg[1])
                continue
            _, rid, prompt, params, grammar = msg
            if not self._wanted(rid):                 # cancelled before it started
                continue
            try:
                eng.add_request(rid, prompt, params, grammar)
            except Exception as e:                    # noqa: BLE001 (reported to the caller)
                self._publish([(rid, e)], self.stats)

    def _run(self) -> None:
        eng = self.engine
        while not self._stop:
            self._take_inbox()
            if not eng.has_unfinished():
                self.stats, self._stats_at = eng.stats(), float("-inf")     # the first busy step's are fresh too
                self._publish([], self.stats)
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
                self._publish([(rid, RuntimeError(f"engine step failed: {e}")) for rid in failed], self.stats)
                continue
            now = time.monotonic()
            fresh = now - self._stats_at >= STATS_EVERY_S
            if fresh:
                self.stats, self._stats_at = eng.stats(), now
            self._publish([(d.request_id, d) for d in deltas], self.stats if fresh else None)
