"""ParallelConfig: how one model replica spreads its routed experts over expert shards (expert parallelism).

Validated on construction; the engine hands it to raymoe.platform.parallel unchanged.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Transport = Literal["local", "ray", "collective"]


class ParallelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # expert shards of one replica; 0: the routed experts live in the engine's own model (no expert parallelism)
    num_shards: int = Field(0, ge=0)
    # local: shards are objects in the router's process (the numerical reference); ray: actor calls;
    # collective: Ray places the shard actors, rows travel over a torch.distributed group (gloo on CPU)
    transport: Transport = "ray"
    plan: str | None = None                 # a placement plan JSON file; None: contiguous ranges
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD"] = "PACK"
    use_placement_group: bool = True        # ray/collective: place the shards in a placement group
    cpus_per_shard: float = Field(1.0, ge=0)
    gpus_per_shard: float = Field(0.0, ge=0)
    router_cpus: float = Field(1.0, ge=0)   # the router's bundle, when raymoe creates the replica's group
    router_gpus: float = Field(0.0, ge=0)
    # a step whose shard fails waits this long for it to come back (Ray restarts it) before its requests fail
    step_deadline_s: float = Field(60.0, gt=0)
    shard_start_timeout_s: float = Field(300.0, gt=0)   # new shards must have loaded by then (start, re-plan)
    # CUDA: capture the decode step piecewise, as graphs of the segments between MoE exchanges replayed around the
    # eager exchanges (False: steps with remote experts run eager; a remote call itself is never captured). On by
    # default: on an H200 (benchmarks/ep_decode.py, BENCHMARKS.md) the piecewise step takes 0.41x / 0.89x of the
    # eager one at batch 1 / 32. No effect on the CPU.
    piecewise_graphs: bool = True
