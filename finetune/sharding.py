"""Data parallelism for the training objective: DDP (every worker holds all weights) or FSDP2 (weights, gradients
and optimizer state sharded over the workers with `torch.distributed.fsdp.fully_shard`, for models whose training
state does not fit one device).

FSDP2 shards each decoder block (main layers and the MTP blocks) as one unit and the rest (embeddings, final norm,
LM head, the MTP projections) at the root, the objective. Its collectives run inside every forward, so all workers
must run the same number of forwards (see `evaluate` in train_loop). Checkpoints gather full, unsharded state on
rank 0 (`gather_state`), so a checkpoint reads the same whichever strategy wrote it and resumes on any number of
workers; weights are loaded before sharding and the optimizer state after it (`load_optimizer_state`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from raymoe.finetune.objective import base_model


def wrap(objective: nn.Module, strategy: str, device: torch.device, world: int) -> nn.Module:
    """The module the training loop calls: the objective itself (one worker), DDP around it, or the objective
    sharded in place by FSDP2."""
    if world == 1:
        return objective
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        m = base_model(objective.model)
        for block in [*m.model.layers, *(k.block for k in m.mtp)]:
            fully_shard(block)
        fully_shard(objective)
        return objective
    from torch.nn.parallel import DistributedDataParallel
    # No buffer sync: the only buffers that change (gate biases) change identically on every worker.
    return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False, gradient_as_bucket_view=True)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


@contextmanager
def accumulating(module: nn.Module, sync: bool) -> Iterator[None]:
    """Backward passes inside reduce gradients over workers only when `sync` (the last micro-batch)."""
    if sync:
        yield
    elif is_sharded(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


def as_float(t: torch.Tensor) -> float:
    """A scalar that may be a DTensor (FSDP2's gradient norm) as a Python float."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


@dataclass
class GatheredState:
    model: dict[str, torch.Tensor] | None       # full state dict of the (PEFT-wrapped) model, rank 0 only
    optimizer: dict | None                      # full optimizer state keyed by parameter name, rank 0 only


def gather_state(net: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> GatheredState | None:
    """Full model and optimizer state on rank 0 under FSDP2 (a collective: every worker calls it); None for
    unsharded training, where the objects are read directly."""
    if not sharded:
        return None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return GatheredState(get_model_state_dict(net, options=full),
                         get_optimizer_state_dict(net, optimizer, options=full))


def load_optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    """Load optimizer state written by either strategy (name-keyed from FSDP2, index-keyed from DDP)."""
    named = bool(state.get("state")) and isinstance(next(iter(state["state"])), str)
    if not sharded and not named:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if not named:
        raise ValueError("this checkpoint's optimizer state was written without FSDP2; resume it with "
                         "scaling.strategy=ddp")
    set_optimizer_state_dict(net, optimizer, state, options=StateDictOptions(full_state_dict=True))
