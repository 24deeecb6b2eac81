"""Helpers shared by the expert-parallel tests: engine configs with small logical resources."""
from __future__ import annotations

from raymoe.platform.config import EngineConfig, ParallelConfig

# small logical resources: the session's Ray has 8 logical CPUs on a 2-core machine
SMALL = dict(cpus_per_shard=0.25, router_cpus=0.25)


def engine_config(path, num_shards: int = 0, transport: str = "local", num_blocks: int = 256,
                  **parallel) -> EngineConfig:
    return EngineConfig(model=str(path), num_blocks=num_blocks, block_size=4, enforce_eager=True,
                        parallel=ParallelConfig(num_shards=num_shards, transport=transport, **{**SMALL, **parallel}))
