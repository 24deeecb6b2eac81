"""Router: the Ray actor that runs one model replica's engine over expert shards.

It owns embeddings, attention with the paged latent cache, dense layers, gates, shared experts, head and MTP, and
the engine loop (an `AsyncEngine`); its routed experts live on the shards it starts inside its own placement group
(bundle 0 is the router's, bundles 1..N the shards'). Requests stream back as dicts of `Delta` fields. It also
takes live re-plans and reports expert load, balance and the shards' actors. `start_router` creates the group and
the actor. Nothing here is HTTP: the serving deployment calls the same engine.
"""
from __future__ import annotations

import asyncio
import dataclasses

from raymoe.platform.config import EngineConfig, SamplingParams


class Router:
    def __init__(self, cfg: dict) -> None:
        from raymoe.platform.engine import AsyncEngine
        self.cfg = EngineConfig.model_validate(cfg)
        self.engine = AsyncEngine(self.cfg)

    async def generate(self, prompt_ids: list[int], params: dict, request_id: str | None = None):
        """Stream one request's deltas (dicts). Call with `.options(num_returns="streaming")`."""
        async for d in self.engine.generate(prompt_ids, SamplingParams.model_validate(params), request_id):
            yield dataclasses.asdict(d)

    async def apply_plan(self, plan: dict) -> int:
        """Re-plan live (returns once the new plan serves); the number of shards now."""
        from raymoe.platform.parallel.plan import PlacementPlan
        p = PlacementPlan.model_validate(plan)
        await asyncio.to_thread(self._ep().apply_plan, p)
        return len(p.shards)

    def _ep(self):
        ep = self.engine.engine.ep
        if ep is None:
            raise ValueError("this router has no expert shards (parallel.num_shards is 0)")
        return ep

    def plan(self) -> dict:
        return self._ep().plan.model_dump()

    def shard_actors(self) -> list:
        """The shards' Ray actor handles (empty for the in-process transport)."""
        return list(getattr(self._ep().active, "actors", []))

    def keys_read(self) -> list[list[str]]:
        return self._ep().keys_read()

    async def expert_load(self) -> dict[int, list[int]]:
        return await asyncio.to_thread(self.engine.engine.expert_load)

    async def expert_balance(self) -> dict:
        """Max/mean load per layer over experts and over shards (a BalanceReport as a dict)."""
        return (await asyncio.to_thread(self.engine.engine.expert_balance)).model_dump()

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()


def start_router(cfg: EngineConfig, num_cpus: float | None = None):
    """Create the replica's placement group (router + shard bundles) and the Router actor in bundle 0."""
    import ray
    from ray.util import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from raymoe.platform.parallel.placement import replica_bundles
    par = cfg.parallel
    opts: dict = {"num_cpus": par.router_cpus if num_cpus is None else num_cpus, "num_gpus": par.router_gpus,
                  "max_concurrency": 16}
    if par.num_shards and par.transport != "local" and par.use_placement_group:
        group = placement_group(replica_bundles(par), strategy=par.placement_strategy)
        ray.get(group.ready(), timeout=120)
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)   # as Serve places
    return ray.remote(Router).options(**opts).remote(cfg.model_dump())
