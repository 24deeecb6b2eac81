"""ModelServer: the model deployment. Each replica owns one engine built from one EngineConfig, stepped in a
child process of its own (EngineProcess; the replica's event loop, which does Serve's per-request work for every
token, then never shares a GIL with the steps; with expert shards it starts them) or in a thread of the replica
(AsyncEngine): ServeAppConfig.engine_core. Both are an EngineClient; this module asks nothing of the engine object
behind them.

`generate` streams a request's deltas back to the ingress, coalescing those that are ready together into one
message (one Ray streaming item per engine step, not per token, once a replica is busy). A caller that goes away
cancels the stream here, which leaves the engine's iterator and so aborts the request (its KV blocks are freed).
Every `metrics_interval_s` the replica reports its engine's gauges to the MetricsCollector. Serve scales replicas
(autoscaling_config, max_ongoing_requests come from ServeAppConfig); this module never sees HTTP. With
`ingress: fused` the ingress replica holds a ModelServer object itself (not the deployment: the class).

LoRA adapters reach a replica through Serve's model multiplexing (`AdapterHost`, shared with the vLLM replica:
the multiplexed loader fetches an adapter and calls `engine.load_adapter`; a request carries its AdapterRef, so a
replica holding an older generation of a name reloads it). The engine's own pool keeps adapters resident (LRU,
max_loras on the device, max_cpu_loras more in host memory); an adapter it has dropped is loaded again here.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from ray import serve

from raymoe.deployments.adapter_host import AdapterHost
from raymoe.deployments.adapters import AdapterRef
from raymoe.deployments.metrics import EngineReport
from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine import AsyncEngine, EngineClient, EngineProcess

log = logging.getLogger(__name__)


@serve.deployment(name="ModelServer")
class ModelServer(AdapterHost):
    async def __init__(self, engine_config: EngineConfig, metrics=None, metrics_interval_s: float = 1.0,
                       preload: list[AdapterRef] = (), engine_process: bool = False) -> None:
        front = EngineProcess if engine_process else AsyncEngine
        self.engine: EngineClient = await asyncio.to_thread(front, engine_config)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx else "local"
        self.metrics, self.interval = metrics, metrics_interval_s
        self._init_adapters(engine_config.max_loras)
        for ref in preload:                           # lora_modules: on every replica, before it takes requests
            await self.ensure(ref)
        self._reporter = asyncio.create_task(self._report_loop()) if metrics is not None else None

    # ---- adapters (AdapterHost) -----------------------------------------------------------------------------------
    async def _engine_held(self) -> Collection[str]:
        return await self.engine.adapters()

    def _engine_held_now(self) -> Collection[str]:
        return self.engine.stats().get("adapters", {}).get("loaded", ())

    async def _engine_load(self, name: str, path: str) -> dict:
        return await self.engine.load_adapter(name, path)

    async def _engine_unload(self, name: str) -> None:
        await self.engine.unload_adapter(name)

    # ---- generation ----------------------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       adapter: AdapterRef | None = None):
        """Yield lists of Delta: everything the engine produced for this request since the last yield."""
        if adapter is not None:
            await self.ensure(adapter)
        async for batch in self.engine.stream(prompt_ids, params, request_id):
            yield batch

    def stats(self) -> dict:
        return self.engine.stats()

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine has stopped")

    async def _report_loop(self) -> None:
        while True:
            try:
                s = self.stats()
                await self.metrics.report.remote(EngineReport(
                    replica=self.replica, running=s["running"], waiting=s["waiting"],
                    kv_cache_usage=s["kv_cache_usage"], prefix_cache_queries=s["prefix_cache_queries"],
                    prefix_cache_hits=s["prefix_cache_hits"], preemptions=s.get("preemptions", 0),
                    expert_load=await self.engine.expert_load(), max_lora=self.max_loras,
                    running_adapters=s["running_adapters"], waiting_adapters=s["waiting_adapters"]))
            except Exception as e:             # noqa: BLE001 (metrics never take a replica down)
                log.warning("metrics report failed: %s", e)
            await asyncio.sleep(self.interval)

    def __del__(self) -> None:
        if getattr(self, "_reporter", None) is not None:
            self._reporter.cancel()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
