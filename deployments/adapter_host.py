"""LoRA adapters on a model replica, for both engines: the replica side of Serve's model multiplexing.

The ingress calls a model replica with `.options(multiplexed_model_id=<adapter>)`, so Serve routes a request to a
replica that already holds its adapter when one does. `AdapterHost` is what such a replica runs: a multiplexed
loader (`serve.multiplexed(max_num_models_per_replica=max_loras)`, wired at construction because max_loras is
configuration) that fetches the adapter (remote roots: to a local cache) and hands it to the engine, `ensure` for
the request path (a request carries its AdapterRef, so a replica holding an older generation of a name reloads it),
and the load / unload calls behind POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

The engine enters through four methods the replica class provides: `_engine_held` (the names the engine holds,
asked of it), `_engine_held_now` (the same as last seen, no round trip: may be stale), `_engine_load(name, path)`
(raises AdapterInvalid for a broken adapter) and `_engine_unload(name)` (raises AdapterNotFound when it is not held).
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Collection
from pathlib import Path

from ray import serve

from raymoe.deployments.adapters import AdapterRef, fetch
from raymoe.platform.engine.adapters import AdapterNotFound

log = logging.getLogger(__name__)


class AdapterHost:
    """Mixin of the model deployments (ModelServer, VLLMServer): see the module docstring."""

    def _init_adapters(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._wanted: dict[str, AdapterRef] = {}      # name -> the ref the multiplexed loader is asked for
        self._loaded: dict[str, AdapterRef] = {}      # name -> the ref the engine holds
        self._load_lock = asyncio.Lock()
        self._cache = Path(os.environ.get("RAYMOE_LORA_CACHE") or tempfile.gettempdir()) / "raymoe-lora"

        async def multiplexed_loader(name: str) -> AdapterRef:
            ref = self._wanted.get(name)
            if ref is None:                           # unloaded while this request waited for the loader
                raise AdapterNotFound(f"adapter {name!r} was unloaded")
            return await self._load(ref)

        self._adapter = serve.multiplexed(max_num_models_per_replica=max_loras)(multiplexed_loader)

    # the engine's side (the replica class implements these)
    async def _engine_held(self) -> Collection[str]:
        raise NotImplementedError

    def _engine_held_now(self) -> Collection[str]:
        raise NotImplementedError

    async def _engine_load(self, name: str, path: str) -> dict:
        raise NotImplementedError

    async def _engine_unload(self, name: str) -> None:
        raise NotImplementedError

    async def _load(self, ref: AdapterRef) -> AdapterRef:
        """Fetch and load `ref` into the engine (replacing an older generation of its name). Raises the engine's
        AdapterInvalid for a broken adapter."""
        async with self._load_lock:
            if self._loaded.get(ref.name) == ref and ref.name in await self._engine_held():
                return ref
            local = await asyncio.to_thread(fetch, ref, self._cache)
            if ref.name in await self._engine_held():
                await self._engine_unload(ref.name)
            self._loaded.pop(ref.name, None)
            info = await self._engine_load(ref.name, str(local))
            log.info("loaded adapter %s (rank %s) from %s", ref.name, info.get("rank"), ref.path)
            self._loaded[ref.name] = ref
            return ref

    async def ensure(self, ref: AdapterRef) -> None:
        """Make `ref` usable by this replica's engine: through the multiplexed loader (which tells Serve's router
        this replica holds it), then again directly if the engine has dropped it or holds another generation."""
        self._wanted[ref.name] = ref
        await self._adapter(ref.name)
        # the request path: the engine's adapter names as last seen (no round trip to an engine process); when they
        # are stale, _load asks the engine itself and returns at once if the adapter is there
        if self._loaded.get(ref.name) != ref or ref.name not in self._engine_held_now():
            await self._load(ref)

    async def load_adapter(self, ref: AdapterRef) -> dict:
        """POST /v1/load_lora_adapter reaches one replica (the multiplexing router's choice) through this: it
        loads the adapter, so a broken one is refused before the name is served."""
        await self.ensure(ref)
        return {"name": ref.name, "replica": self.replica}

    async def unload_adapter(self, name: str) -> bool:
        """Drop `name` from this replica's engine (if it holds it); running requests on it finish first."""
        async with self._load_lock:
            self._loaded.pop(name, None)
            self._wanted.pop(name, None)
            if name not in await self._engine_held():
                return False
            try:
                await self._engine_unload(name)
            except AdapterNotFound:
                return False
            return True
