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

LoRA adapters reach a replica through Serve's model multiplexing: the ingress calls with
`.options(multiplexed_model_id=<adapter>)`, so Serve routes the request to a replica that already holds the adapter
when one does; the replica's multiplexed loader (`serve.multiplexed(max_num_models_per_replica=max_loras)`, wired
in __init__ because max_loras is configuration) fetches the adapter (remote roots: to a local cache) and calls
`engine.load_adapter`. A request carries its AdapterRef, so a replica that holds an older generation of a name
(loaded again under the same name) reloads it before serving. The engine's own pool keeps adapters resident (LRU,
max_loras on the device, max_cpu_loras more in host memory); an adapter it has dropped is loaded again here.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path

from ray import serve

from raymoe.deployments.adapters import AdapterRef, fetch
from raymoe.deployments.metrics import EngineReport
from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine import AsyncEngine, EngineClient, EngineProcess
from raymoe.platform.engine.adapters import AdapterNotFound

log = logging.getLogger(__name__)


@serve.deployment(name="ModelServer")
class ModelServer:
    async def __init__(self, engine_config: EngineConfig, metrics=None, metrics_interval_s: float = 1.0,
                       preload: list[AdapterRef] = (), engine_process: bool = False) -> None:
        front = EngineProcess if engine_process else AsyncEngine
        self.engine: EngineClient = await asyncio.to_thread(front, engine_config)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx else "local"
        self.metrics, self.interval = metrics, metrics_interval_s
        self.max_loras = engine_config.max_loras
        self._wanted: dict[str, AdapterRef] = {}      # name -> the ref the multiplexed loader is asked for
        self._loaded: dict[str, AdapterRef] = {}      # name -> the ref the engine holds
        self._load_lock = asyncio.Lock()
        self._cache = Path(os.environ.get("RAYMOE_LORA_CACHE") or tempfile.gettempdir()) / "raymoe-lora"

        async def multiplexed_loader(name: str) -> AdapterRef:
            ref = self._wanted.get(name)
            if ref is None:                           # unloaded while this request waited for the loader
                raise AdapterNotFound(f"adapter {name!r} was unloaded")
            return await self._load(ref)

        self._adapter = serve.multiplexed(max_num_models_per_replica=self.max_loras)(multiplexed_loader)
        for ref in preload:                           # lora_modules: on every replica, before it takes requests
            await self._ensure(ref)
        self._reporter = asyncio.create_task(self._report_loop()) if metrics is not None else None

    # ---- adapters ------------------------------------------------------------------------------------------------
    async def _load(self, ref: AdapterRef) -> AdapterRef:
        """Fetch and load `ref` into the engine (replacing an older generation of its name). Raises the engine's
        AdapterInvalid for a broken adapter."""
        async with self._load_lock:
            if self._loaded.get(ref.name) == ref and ref.name in await self.engine.adapters():
                return ref
            local = await asyncio.to_thread(fetch, ref, self._cache)
            if ref.name in await self.engine.adapters():
                await self.engine.unload_adapter(ref.name)
            self._loaded.pop(ref.name, None)
            info = await self.engine.load_adapter(ref.name, str(local))
            log.info("loaded adapter %s (rank %s) from %s", ref.name, info.get("rank"), ref.path)
            self._loaded[ref.name] = ref
            return ref

    async def _ensure(self, ref: AdapterRef) -> None:
        """Make `ref` usable by this replica's engine: through the multiplexed loader (which tells Serve's router
        this replica holds it), then again directly if the engine has dropped it or holds another generation."""
        self._wanted[ref.name] = ref
        await self._adapter(ref.name)
        # the request path: the engine's adapter names as of its last step (no round trip to an engine process);
        # when they are stale, _load asks the engine itself and returns at once if the adapter is there
        held = self.engine.stats().get("adapters", {}).get("loaded", ())
        if self._loaded.get(ref.name) != ref or ref.name not in held:
            await self._load(ref)

    async def load_adapter(self, ref: AdapterRef) -> dict:
        """POST /v1/load_lora_adapter reaches one replica (the multiplexing router's choice) through this: it
        loads the adapter, so a broken one is refused before the name is served."""
        await self._ensure(ref)
        return {"name": ref.name, "replica": self.replica}

    async def unload_adapter(self, name: str) -> bool:
        """Drop `name` from this replica's engine (if it holds it); running requests on it finish first."""
        async with self._load_lock:
            self._loaded.pop(name, None)
            self._wanted.pop(name, None)
            if name not in await self.engine.adapters():
                return False
            try:
                await self.engine.unload_adapter(name)
            except AdapterNotFound:
                return False
            return True

    # ---- generation ----------------------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       adapter: AdapterRef | None = None):
        """Yield lists of Delta: everything the engine produced for this request since the last yield."""
        if adapter is not None:
            await self._ensure(adapter)
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
