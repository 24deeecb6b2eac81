"""ModelServer: the model deployment. Each replica owns one AsyncEngine built from one EngineConfig.

`generate` streams a request's deltas back to the ingress, coalescing those that are ready together into one
message (one Ray streaming item per engine step, not per token, once a replica is busy). A caller that goes away
cancels the stream here, which leaves the engine's iterator and so aborts the request (its KV blocks are freed).
Every `metrics_interval_s` the replica reports its engine's gauges to the MetricsCollector. Serve scales replicas
(autoscaling_config, max_ongoing_requests come from ServeAppConfig); this module never sees HTTP. With
`ingress: fused` the ingress replica holds a ModelServer object itself (not the deployment: the class).
"""
from __future__ import annotations

import asyncio
import logging

from ray import serve

from raymoe.deployments.metrics import EngineReport
from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine import AsyncEngine

log = logging.getLogger(__name__)


@serve.deployment(name="ModelServer")
class ModelServer:
    async def __init__(self, engine_config: EngineConfig, metrics=None, metrics_interval_s: float = 1.0) -> None:
        self.engine = AsyncEngine(engine_config)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx else "local"
        self.metrics, self.interval = metrics, metrics_interval_s
        self._reporter = asyncio.create_task(self._report_loop()) if metrics is not None else None

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str):
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

    def __del__(self) -> None:
        if getattr(self, "_reporter", None) is not None:
            self._reporter.cancel()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
