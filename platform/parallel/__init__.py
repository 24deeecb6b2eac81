"""Expert parallelism: routed experts on ExpertShards, attention, gates and the engine loop on a Router.

`plan` says which shard holds which experts; `shard` is what a shard runs; `shard_sets` are the transports (one
set of shards serving one plan: in-process, Ray actor calls, or a torch.distributed data plane); `dispatch` is the
MoE dispatch that splits rows over shards and combines what comes back; `expert_parallel` owns it all for one model
replica (live re-planning, fault recovery); `placement` builds the replica's placement group; `router` is the Ray
actor that runs an engine over such a model. Importing this package imports neither Ray nor torch.distributed.
"""
from raymoe.platform.parallel.plan import Balance, BalanceReport, PlacementPlan, ShardExperts

__all__ = ["Balance", "BalanceReport", "PlacementPlan", "ShardExperts"]
