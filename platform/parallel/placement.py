"""Placement groups for one model replica: a router bundle and one bundle per expert shard.

`replica_bundles` is what a Ray Serve deployment passes as `placement_group_bundles`; `ReplicaPlacement` tells each
shard actor which bundle to start in: the group it is given (a Serve replica's, the Router actor's) or one it
creates for the shards alone. A shard takes a free shard bundle; when none is free (a re-plan to more shards, or
new shards starting while the old plan's still serve) it starts outside the group.
"""
from __future__ import annotations

import logging

from raymoe.platform.config import ParallelConfig

log = logging.getLogger(__name__)


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    b = {"CPU": cpus, "GPU": gpus}
    return {k: v for k, v in b.items() if v > 0} or {"CPU": 0.01}


def replica_bundles(cfg: ParallelConfig) -> list[dict[str, float]]:
    """Bundle 0: the router (attention, cache, engine loop); bundles 1..N: the shards."""
    return [_bundle(cfg.router_cpus, cfg.router_gpus)] + [_bundle(cfg.cpus_per_shard, cfg.gpus_per_shard)
                                                          for _ in range(cfg.num_shards)]


class ReplicaPlacement:
    """Where the shards of one replica start. `group`: an existing placement group whose bundle 0 is the router's
    (None: the current one if this process runs in a group, else a new group of shard bundles only)."""

    def __init__(self, cfg: ParallelConfig, group=None) -> None:
        import ray
        from ray.util import get_current_placement_group, placement_group
        self.group, self.first, self.owned = group, 1, False
        if self.group is None:
            self.group = get_current_placement_group()
        if self.group is None:
            self.group = placement_group(replica_bundles(cfg)[1:], strategy=cfg.placement_strategy)
            ray.get(self.group.ready(), timeout=120)
            self.first, self.owned = 0, True
        self.bundles = len(self.group.bundle_specs)
        self.free = set(range(self.first, self.bundles))     # shard bundles no running shard holds

    def acquire(self) -> tuple[dict, int | None]:
        """Actor options for a new shard: a free shard bundle of the group, or outside the group when every one is
        taken (a re-plan to more shards, or while the old plan's shards still hold theirs). -> (options, bundle)"""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        if not self.free:
            log.info("no free shard bundle in the replica's placement group (%d bundles): a shard starts outside it",
                     self.bundles)
            return {"scheduling_strategy": "DEFAULT"}, None
        index = min(self.free)
        self.free.discard(index)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=index, placement_group_capture_child_tasks=False)}, index

    def release(self, bundle: int | None) -> None:
        """The shard in `bundle` was stopped: the bundle takes the next new shard."""
        if bundle is not None:
            self.free.add(bundle)

    def close(self) -> None:
        if self.owned:
            from ray.util import remove_placement_group
            remove_placement_group(self.group)
