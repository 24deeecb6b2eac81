"""ShardedDispatch: the MoE dispatch of a router whose routed experts live on shards.

`send` picks, for every (token, slot) pair, one shard holding that expert (a replicated expert's rows are spread
over its replicas by token index: `owner` [N, k]), hands the layer's batch with `owner` to the shard set, which
sends it to every shard owning some pair, and returns at once; `wait` returns the shards' weighted partial sums
added up in fp32 (each shard computes only the pairs it owns). A shard that fails mid-exchange is waited for (Ray
restarts it) and the whole layer is sent again, until the step deadline; then `ExpertsUnavailable`. Remote: never
captured in a CUDA graph (it refuses; piecewise graphs replay around it) and never traced by a compiler (the
compiled step runs it behind an opaque op). Per-request adapters: of the `lora` a `multi_lora.RowLoraDispatch`
hands down only the rows' adapter slots are used (they travel with the rows; the shards hold the factors).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from raymoe.platform.model.moe import ExpertDispatch
from raymoe.platform.parallel.shard_sets import ExpertsUnavailable, ShardFailure

log = logging.getLogger(__name__)


class RoutingTable:
    """Per MoE layer, which shards hold each expert: `table[layer]` [E, R] shard ids (padded by repetition) and
    `replicas[layer]` [E] how many."""

    def __init__(self, plan, device: torch.device) -> None:
        self.table: dict[int, torch.Tensor] = {}
        self.replicas: dict[int, torch.Tensor] = {}
        for layer in plan.layers:
            holders = plan.holders(layer)                                   # per expert: shard ids
            r = max(len(h) for h in holders)
            self.table[layer] = torch.tensor([[h[j % len(h)] for j in range(r)] for h in holders],
                                             dtype=torch.long, device=device)
            self.replicas[layer] = torch.tensor([len(h) for h in holders], dtype=torch.long, device=device)

    def shard_of(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        # topk_ids: [N, k] -> [N, k] the shard computing each pair
        table = self.table[layer]
        if table.shape[1] == 1:                        # no replicas in this layer: one lookup
            return table[:, 0][topk_ids]
        n = topk_ids.shape[0]
        token = torch.arange(n, device=topk_ids.device)[:, None]
        return self.table[layer][topk_ids, token % self.replicas[layer][topk_ids]]


@dataclass
class _Pending:
    layer: int
    x: torch.Tensor                 # [N, H]
    ids: torch.Tensor               # [N, k]
    w: torch.Tensor                 # [N, k]
    owner: torch.Tensor             # [N, k] the shard computing each pair
    hit: list[int]                  # the shards owning any pair
    slots: torch.Tensor | None      # [N] adapter slot of each row (-1: base); None: no adapters bound
    handle: object = None           # None: to be sent (again)


class ShardedDispatch(ExpertDispatch):
    remote = True

    def __init__(self, ep) -> None:
        self.ep = ep                      # ExpertParallel: its `active` shard set and routing table

    def send(self, layer, hidden, topk_ids, topk_w, lora=None):
        # hidden: [N, H]; topk_ids, topk_w: [N, k] -> pending
        slots = _slots(layer, lora)
        if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a remote expert dispatch cannot be captured in a CUDA graph")
        owner = self.ep.routing.shard_of(layer, topk_ids)                      # [N, k]
        hit = torch.unique(owner).tolist()             # the step's one host sync for the split
        p = _Pending(layer, hidden, topk_ids, topk_w, owner, hit, slots)
        try:
            p.handle = self.ep.active.send(layer, hidden, topk_ids, topk_w, owner, hit, slots)
        except ShardFailure as e:                   # the data plane is down: wait() recovers and sends again
            log.warning("layer %d: %s", layer, e)
        return p

    def wait(self, p: _Pending) -> torch.Tensor:
        shards = self.ep.active
        deadline = time.monotonic() + self.ep.cfg.step_deadline_s
        while True:
            try:
                if p.handle is None:
                    p.handle = shards.send(p.layer, p.x, p.ids, p.w, p.owner, p.hit, p.slots)
                return shards.wait(p.handle)
            except ShardFailure as e:
                p.handle = None
                if time.monotonic() >= deadline:
                    raise ExpertsUnavailable(f"layer {p.layer}: {e} (step deadline "
                                             f"{self.ep.cfg.step_deadline_s:g} s)") from e
                log.warning("layer %d: %s; waiting for the shards (deadline %g s)", p.layer, e,
                            self.ep.cfg.step_deadline_s)
                shards.recover(deadline)            # raises ExpertsUnavailable past the deadline


def _slots(layer: int, lora) -> torch.Tensor | None:
    """The rows' adapter slots of per-row LoRA factors (None: none); the shards hold the factors themselves, so
    other LoRA (a trainer's factors) cannot travel."""
    if not lora:
        return None
    fs = list(lora.values())
    if any(f.slots is None or f.slots is not fs[0].slots for f in fs):
        raise ValueError(f"layer {layer}: only per-request adapters (multi_lora slots) travel to expert shards")
    return fs[0].slots
