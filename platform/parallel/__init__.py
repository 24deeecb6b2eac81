"""Expert parallelism's placement: which shard holds which routed experts of each MoE layer (no Ray, no
torch.distributed, no model code)."""
from raymoe.platform.parallel.plan import Balance, BalanceReport, PlacementPlan, ShardExperts

__all__ = ["Balance", "BalanceReport", "PlacementPlan", "ShardExperts"]
