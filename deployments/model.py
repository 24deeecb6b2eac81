"""The model side of serving: `EngineHost` owns one AsyncEngine built from one EngineConfig, and `ModelServer` is
the model deployment made of it (one host per replica).

`generate` streams a request's deltas, coalescing those that are ready together into one message (one Ray
streaming item per engine step, not per token, once a replica is busy). A caller that goes away closes the stream
here, which leaves the engine's iterator and so aborts the request (its KV blocks are freed). Every
`metrics_interval_s` the host reports its engine's gauges to the MetricsCollector. The fused ingress
(`ingress: fused`) holds an EngineHost itself instead of calling a ModelServer. Serve scales replicas
(autoscaling_config, max_ongoing_requests come from ServeAppConfig); this module never sees HTTP.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator

from ray import serve

from raymoe.deployments.metrics import EngineReport
from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine import AsyncEngine, Delta

log = logging.getLogger(__name__)


class EngineHost:
    """One engine in this process, with its metrics reports. Must be created on a running event loop."""

    def __init__(self, engine_config: EngineConfig, metrics=None, metrics_interval_s: float = 1.0,
                 gil_switch_interval_s: float | None = None) -> None:
        if gil_switch_interval_s is not None:
            sys.setswitchinterval(gil_switch_interval_s)
        self.engine = AsyncEngine(engine_config)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx else "local"
        self.metrics, self.interval = metrics, metrics_interval_s
        self._reporter = asyncio.create_task(self._report_loop()) if metrics is not None else None

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[list[Delta]]:
        """Yield lists of Delta: everything the engine produced for this request since the last yield."""
        async for batch in self.engine.stream(prompt_ids, params, request_id):
            yield batch

    def stats(self) -> dict:
        s = self.engine.stats()
        # LLMEngine.stats() has the hits but not the lookups; read them where the block manager keeps them
        s.setdefault("prefix_cache_queries", getattr(getattr(self.engine.engine, "blocks", None), "prefix_queries", 0))
        return s

    def check_health(self) -> None:
        if not self.engine._thread.is_alive():
            raise RuntimeError("the engine thread has stopped")

    async def _report_loop(self) -> None:
        while True:
            try:
                s = self.stats()
                await self.metrics.report.remote(EngineReport(
                    replica=self.replica, running=s["running"], waiting=s["waiting"],
                    kv_cache_usage=s["kv_cache_usage"], prefix_cache_queries=s["prefix_cache_queries"],
                    prefix_cache_hits=s["prefix_cache_hits"], preemptions=s.get("preemptions", 0),
                    expert_load=self.engine.engine.expert_load()))
            except Exception as e:             # noqa: BLE001 (metrics never take a replica down)
                log.warning("metrics report failed: %s", e)
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        if getattr(self, "_reporter", None) is not None:
            self._reporter.cancel()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
            self.engine = None


@serve.deployment(name="ModelServer")
class ModelServer(EngineHost):
    async def __init__(self, engine_config: EngineConfig, metrics=None, metrics_interval_s: float = 1.0,
                       gil_switch_interval_s: float | None = None) -> None:
        EngineHost.__init__(self, engine_config, metrics, metrics_interval_s, gil_switch_interval_s)

    def __del__(self) -> None:
        self.close()
