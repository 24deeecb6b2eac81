"""ShardedDispatch: the MoE dispatch of a router whose routed experts live on shards.

`send` picks, for every (token, slot) pair, one shard holding that expert (a replicated expert's rows are spread
over its replicas by token index), sends each shard the tokens it has work for, with the expert ids it must compute
(-1 for a pair another shard computes) and the routing weights, and returns at once; `wait` collects the shards'
partial sums and adds them up in fp32. A shard that fails mid-exchange is waited for (Ray restarts it) and the
whole layer is sent again, until the step deadline; then `ExpertsUnavailable`. Remote: never captured in a CUDA
graph (it refuses) and never traced by a compiler (the compiled step runs it behind an opaque op).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

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
        n = topk_ids.shape[0]
        token = torch.arange(n, device=topk_ids.device)[:, None]
        return self.table[layer][topk_ids, token % self.replicas[layer][topk_ids]]


@dataclass
class _Pending:
    layer: int
    x: torch.Tensor
    parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # shard, rows, x, ids, w
    handles: list | None = field(default_factory=list)     # None: to be sent (again)


class ShardedDispatch(ExpertDispatch):
    remote = True

    def __init__(self, ep) -> None:
        self.ep = ep                      # ExpertParallel: its `active` shard set and routing table

    def send(self, layer, hidden, topk_ids, topk_w, lora=None):
        # hidden: [N, H]; topk_ids, topk_w: [N, k] -> pending
        if lora:
            raise ValueError(f"layer {layer}: routed-expert LoRA cannot travel to expert shards yet")
        if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a remote expert dispatch cannot be captured in a CUDA graph")
        shards, routing = self.ep.active, self.ep.routing
        owner = routing.shard_of(layer, topk_ids)                              # [N, k]
        n, num = topk_ids.shape[0], len(shards.plan.shards)
        hit = torch.zeros(n, num, dtype=torch.bool, device=owner.device).scatter_(1, owner, True)   # [N, S]
        pairs = hit.t().nonzero()                      # [M, 2] (shard, token), grouped by shard
        counts = hit.sum(0).tolist()                   # the step's one host sync for the split
        shard, token = pairs[:, 0], pairs[:, 1]
        mine = owner[token] == shard[:, None]                                  # [M, k]
        ids = torch.where(mine, topk_ids[token], -1)
        w = torch.where(mine, topk_w[token], 0)
        xs = hidden[token]
        parts = [(s, r, x, i, ww) for s, r, x, i, ww in zip(range(num), token.split(counts), xs.split(counts),
                                                             ids.split(counts), w.split(counts)) if counts[s]]
        p = _Pending(layer, hidden, parts)
        try:
            p.handles = self._send_all(shards, p)
        except ShardFailure as e:                   # the data plane is down: wait() recovers and sends again
            log.warning("layer %d: %s", layer, e)
            p.handles = None
        return p

    def _send_all(self, shards, p: _Pending) -> list:
        return [shards.send(s, p.layer, x, ids, w) for s, _rows, x, ids, w in p.parts]

    def wait(self, p: _Pending) -> torch.Tensor:
        shards = self.ep.active
        deadline = time.monotonic() + self.ep.cfg.step_deadline_s
        while True:
            try:
                if p.handles is None:
                    p.handles = self._send_all(shards, p)
                ys = [shards.wait(h) for h in p.handles]
                break
            except ShardFailure as e:
                p.handles = None
                if time.monotonic() >= deadline:
                    raise ExpertsUnavailable(f"layer {p.layer}: {e} (step deadline "
                                             f"{self.ep.cfg.step_deadline_s:g} s)") from e
                log.warning("layer %d: %s; waiting for the shards (deadline %g s)", p.layer, e,
                            self.ep.cfg.step_deadline_s)
                shards.recover(deadline)            # raises ExpertsUnavailable past the deadline
        out = torch.zeros(p.x.shape, dtype=torch.float32, device=p.x.device)
        for (_s, rows, *_), y in zip(p.parts, ys):
            out.index_add_(0, rows, y.float())
        return out.to(p.x.dtype)
