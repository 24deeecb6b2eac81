"""ExpertParallel: the expert shards of one model replica, seen from its router.

Loads the placement plan (a JSON file, or contiguous ranges), starts the shard set of the configured transport
(inside the replica's placement group), and installs a `ShardedDispatch` on every MoE layer of the router's model.
`apply_plan` re-plans live: the new set (shards whose experts are unchanged are kept, the others start and load) is
built while steps go on, then swapped in between two steps, under the lock every step holds (`stepping`), so a
step never mixes two plans. Per-request adapters: `write_lora(slot, factors)` (called by the engine's adapter pool
when it puts an adapter into a slot, inside a step) records the routed-expert factors (`AdapterSlots`) and writes
them to the shards before returning; a new plan's new shards get every resident slot before they serve, and a
recovery re-sends them to restarted shards. It never touches attention, caches or scheduling.
"""
from __future__ import annotations

import contextlib
import logging
import threading

from raymoe.platform.config import ParallelConfig
from raymoe.platform.model import DeepseekV3ForCausalLM
from raymoe.platform.parallel.dispatch import RoutingTable, ShardedDispatch
from raymoe.platform.parallel.plan import PlacementPlan
from raymoe.platform.parallel.shard_lora import AdapterSlots, SlotFactors
from raymoe.platform.parallel.shard_sets import SHARD_SETS

log = logging.getLogger(__name__)


class ExpertParallel:
    def __init__(self, path: str, model: DeepseekV3ForCausalLM, cfg: ParallelConfig,
                 placement_group=None, max_loras: int = 0, max_lora_rank: int = 0,
                 quantization: str = "none") -> None:
        # max_loras, max_lora_rank: the engine's adapter slots, which the shards mirror (0: no adapters)
        # quantization: the engine's (EngineConfig.quantization); each shard applies it on its own device
        self.path, self.cfg, self.quantization = str(path), cfg, quantization
        self.lora = AdapterSlots(max_loras, max_lora_rank)
        p = next(model.parameters())
        self.device, self.dtype = p.device, str(p.dtype).removeprefix("torch.")
        self.layers = [m.layer for m in model.moe_layers()]
        self.num_experts = model.config.n_routed_experts
        plan = (PlacementPlan.load(cfg.plan) if cfg.plan else
                PlacementPlan.contiguous(cfg.num_shards, self.layers, self.num_experts))
        self._check(plan)
        self.placement = None
        if cfg.transport != "local" and cfg.use_placement_group:
            from raymoe.platform.parallel.placement import ReplicaPlacement
            self.placement = ReplicaPlacement(cfg, placement_group)
        self._lock = threading.RLock()
        self.active = self._build(plan)
        self.routing = RoutingTable(plan, self.device)
        self.active.activate()
        for m in model.moe_layers():
            if m.dispatch is not None:
                raise ValueError(f"layer {m.layer}: already has a dispatch ({type(m.dispatch).__name__}); "
                                 f"expert shards must be installed first")
            m.dispatch = ShardedDispatch(self)
        self.plans_applied = 0

    @property
    def plan(self) -> PlacementPlan:
        return self.active.plan

    def _check(self, plan: PlacementPlan) -> None:
        if plan.num_experts != self.num_experts or sorted(plan.layers) != sorted(self.layers):
            raise ValueError(f"the placement plan covers layers {plan.layers} of {plan.num_experts} experts; this "
                             f"model has MoE layers {self.layers} of {self.num_experts} experts")

    def _build(self, plan: PlacementPlan, reuse=None):
        cls = SHARD_SETS[self.cfg.transport]
        return cls(self.path, plan, self.cfg, self.dtype, "cpu" if self.device.type == "cpu" else str(self.device),
                   reuse=reuse, placement=self.placement, quantization=self.quantization, lora=self.lora)

    @contextlib.contextmanager
    def stepping(self):
        """Held for a whole engine step: the plan cannot change inside it."""
        with self._lock:
            yield

    def apply_plan(self, plan: PlacementPlan) -> None:
        """Move experts, add or remove shards, while requests go on; returns once the new plan serves."""
        self._check(plan)
        new = self._build(plan, reuse=self.active)          # new shards load outside the lock: steps go on
        routing = RoutingTable(plan, self.device)
        with self._lock:                                    # between two steps
            new.sync_lora()                                 # new shards get the resident adapters first
            old = self.active
            old.deactivate()
            new.activate()
            self.active, self.routing = new, routing
            self.plans_applied += 1
        old.close(keep=new)
        log.info("placement plan applied: %d shards", len(plan.shards))

    def write_lora(self, slot: int, factors: SlotFactors) -> None:
        """Adapter slot `slot` now holds `factors` (MoE layer -> weight -> (a [E, r, in], b [E, out, r]) over all
        the layer's experts, scale folded into b); every shard holds its experts' share when this returns."""
        with self._lock:
            self.lora.put(slot, factors)
            self.active.write_lora(slot)

    def keys_read(self) -> list[list[str]]:
        return self.active.keys_read()

    def close(self) -> None:
        with self._lock:
            self.active.close()
        if self.placement is not None:
            self.placement.close()

