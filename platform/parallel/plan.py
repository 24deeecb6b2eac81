"""Expert placement for expert parallelism: which shard holds which routed experts of which MoE layer.

Owns the plan (shard -> MoE layer -> sorted global expert ids, MTP layers included), its checks, its two
constructions (contiguous ranges, or balanced from measured loads as DeepSeek's EPLB does: replicate the hottest
experts, then pack the replicas onto shards heaviest first), the per-shard load a plan implies, and its JSON file.
It never starts Ray, never touches torch.distributed, never imports model code and never moves a weight: dispatch
and weight loading read a plan; they do not live here.
"""
from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    import torch

    # tokens routed to each expert: {layer: [E]}, or [L, E] (a tensor or nested list) with the layers given apart
    Loads = Mapping[int, Sequence[float]] | Sequence[Sequence[float]] | torch.Tensor


def _layer_loads(loads: Loads, layers: Sequence[int] | None) -> dict[int, list[float]]:
    """`loads` as {layer: [E] floats}, layers ascending; a [L, E] array needs `layers` (its rows' layer ids)."""
    if isinstance(loads, Mapping):
        out = {int(k): v.tolist() if hasattr(v, "tolist") else list(v) for k, v in loads.items()}
        if layers is not None and sorted(out) != sorted(layers):
            raise ValueError(f"loads cover layers {sorted(out)}, expected {sorted(layers)}")
    else:
        rows = loads.tolist() if hasattr(loads, "tolist") else [list(r) for r in loads]
        if layers is None:
            raise ValueError("loads given as a [layers, experts] array need `layers` (the MoE layer of each row)")
        if len(rows) != len(layers):
            raise ValueError(f"loads has {len(rows)} rows for {len(layers)} layers {list(layers)}")
        out = {int(k): row for k, row in zip(layers, rows)}
    if not out:
        raise ValueError("loads cover no layer")
    width = len(next(iter(out.values())))
    for layer, row in out.items():
        if len(row) != width or width == 0:
            raise ValueError(f"loads of layer {layer}: {len(row)} experts, expected {width} like the first layer")
        for e, x in enumerate(row):
            if not x >= 0:
                raise ValueError(f"loads of layer {layer}: expert {e} has load {x}, expected a count >= 0")
    return {k: [float(x) for x in out[k]] for k in sorted(out)}


def _replicate(load: list[float], num_replicas: int, num_shards: int) -> list[int]:
    """Copies per expert ([E]): each extra replica goes to the expert with the highest load per copy (ties: lowest
    id), never past one copy per shard."""
    counts = [1] * len(load)
    heap = [(-x, e) for e, x in enumerate(load)] if num_shards > 1 else []
    heapq.heapify(heap)
    for _ in range(num_replicas):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < num_shards:
            heapq.heappush(heap, (-load[e] / counts[e], e))
    return counts


def _fits(multi: Counter[int], room: list[int]) -> bool:
    """Can groups needing `multi` distinct shards each (plus any number of single copies, up to the total room) still
    be placed on shards with `room` free slots? Gale-Ryser: for every k, the k largest groups need at most
    sum(min(room, k)). Single copies never break it, so only k up to the number of multi-copy groups is checked."""
    need = 0
    for k, c in enumerate(sorted(multi.elements(), reverse=True), start=1):
        need += c
        if need > sum(min(r, k) for r in room):
            return False
    return True


def _pack(load: list[float], counts: list[int], num_shards: int) -> list[list[int]]:
    """Experts per shard: all replicas, heaviest (load per copy) first, each onto the least-loaded shards with a free
    slot, copies of one expert on distinct shards. Every shard has ceil(replicas / shards) slots. If the greedy choice
    would leave a later expert's copies without enough distinct shards, the expert takes the shards with the most
    free slots instead, which always leaves a placement (the exchange argument behind Gale-Ryser)."""
    cap = -(-sum(counts) // num_shards)
    room, shard_load = [cap] * num_shards, [0.0] * num_shards
    held: list[list[int]] = [[] for _ in range(num_shards)]
    multi = Counter(c for c in counts if c > 1)          # copy counts of experts with replicas, not yet placed
    for e in sorted(range(len(load)), key=lambda e: (-load[e] / counts[e], e)):
        c, w = counts[e], load[e] / counts[e]
        if c > 1:
            multi[c] -= 1
        free = [s for s in range(num_shards) if room[s]]
        pick = sorted(free, key=lambda s: (shard_load[s], s))[:c]
        if multi.total() and not _fits(multi, [r - (s in pick) for s, r in enumerate(room)]):
            pick = sorted(free, key=lambda s: (-room[s], shard_load[s], s))[:c]
        for s in pick:
            room[s] -= 1
            shard_load[s] += w
            held[s].append(e)
    return [sorted(h) for h in held]


class ShardExperts(BaseModel):
    """One shard's routed experts: MoE layer -> sorted global expert ids (a shard may hold none of a layer)."""
    model_config = ConfigDict(extra="forbid")

    experts: dict[int, list[int]]

    @field_validator("experts")
    @classmethod
    def _sorted(cls, v: dict[int, list[int]]) -> dict[int, list[int]]:
        return {layer: sorted(ids) for layer, ids in sorted(v.items())}


class Balance(BaseModel):
    """Load over a layer's experts and over the shards holding them (tokens; replicas share an expert's load)."""
    expert_max: float
    expert_mean: float
    shard_max: float
    shard_mean: float

    @property
    def expert_ratio(self) -> float:
        return self.expert_max / self.expert_mean if self.expert_mean else 1.0

    @property
    def shard_ratio(self) -> float:
        """max/mean over shards: 1.0 is perfect balance; the step waits for the busiest shard."""
        return self.shard_max / self.shard_mean if self.shard_mean else 1.0


class BalanceReport(BaseModel):
    """Per-layer balance, and overall: sums over layers (each layer waits for its busiest shard, so a step costs
    the sum of per-layer maxima against the sum of means)."""
    layers: dict[int, Balance]
    overall: Balance

    def table(self) -> str:
        head = f"{'layer':>6} {'expert max/mean':>16} {'shard max/mean':>15} {'shard max':>12} {'shard mean':>12}"
        rows = [(str(layer), b) for layer, b in self.layers.items()] + [("all", self.overall)]
        return "\n".join([head] + [f"{name:>6} {b.expert_ratio:>16.3f} {b.shard_ratio:>15.3f} {b.shard_max:>12.1f} "
                                   f"{b.shard_mean:>12.1f}" for name, b in rows])


class PlacementPlan(BaseModel):
    """Which shard holds which routed experts of each MoE layer; an expert held by several shards is replicated and
    its tokens are split among its copies."""
    model_config = ConfigDict(extra="forbid")

    num_experts: int = Field(gt=0)     # routed experts per layer (256 for DeepSeek-V3)
    layers: list[int]                  # MoE layers covered, MTP included, e.g. [3, 4, ..., 61]
    shards: list[ShardExperts]         # [num_shards]

    @model_validator(mode="after")
    def _check(self) -> PlacementPlan:
        if not self.shards:
            raise ValueError("a placement plan needs at least one shard")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} lists a layer twice")
        held = {layer: [0] * self.num_experts for layer in self.layers}
        for s, shard in enumerate(self.shards):
            for layer, ids in shard.experts.items():
                if layer not in held:
                    raise ValueError(f"shard {s}: layer {layer} is not one of the plan's layers {self.layers}")
                for i, e in enumerate(ids):
                    if not 0 <= e < self.num_experts:
                        raise ValueError(f"shard {s}, layer {layer}: expert {e} out of range [0, {self.num_experts})")
                    if i and ids[i - 1] == e:
                        raise ValueError(f"shard {s}, layer {layer}: expert {e} listed twice")
                    held[layer][e] += 1
        for layer, n in held.items():
            missing = [e for e, c in enumerate(n) if c == 0]
            if missing:
                more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
                raise ValueError(f"layer {layer}: expert(s) {missing[:8]}{more} held by no shard")
        return self

    # ---- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def contiguous(cls, num_shards: int, layers: Sequence[int], num_experts: int) -> PlacementPlan:
        """Shard s holds experts [s*E/N, (s+1)*E/N) of every layer; a remainder goes one each to the first shards."""
        if not 1 <= num_shards <= num_experts:
            raise ValueError(f"num_shards {num_shards}: expected 1 to num_experts ({num_experts})")
        base, extra = divmod(num_experts, num_shards)
        start = [s * base + min(s, extra) for s in range(num_shards + 1)]
        return cls(num_experts=num_experts, layers=list(layers),
                   shards=[ShardExperts(experts={layer: list(range(start[s], start[s + 1])) for layer in layers})
                           for s in range(num_shards)])

    @classmethod
    def balanced(cls, loads: Loads, num_shards: int, num_replicas: int = 0,
                 layers: Sequence[int] | None = None) -> PlacementPlan:
        """A plan balanced for measured `loads` ({layer: [E]}, or [L, E] with `layers`), as DeepSeek's EPLB: per
        layer, `num_replicas` extra copies go one at a time to the expert with the highest load per copy; then every
        copy is packed heaviest first onto the least-loaded shard with a free slot (ceil(copies / shards) slots
        each), never two copies of an expert on one shard. Deterministic: ties go to the lower expert or shard id."""
        per_layer = _layer_loads(loads, layers)
        num_experts = len(next(iter(per_layer.values())))
        if num_shards < 1:
            raise ValueError(f"num_shards {num_shards}: expected at least 1")
        if not 0 <= num_replicas <= num_experts * (num_shards - 1):
            raise ValueError(f"num_replicas {num_replicas}: expected 0 to {num_experts * (num_shards - 1)} (one copy "
                             f"of each of {num_experts} experts per shard over {num_shards} shards)")
        shards: list[dict[int, list[int]]] = [{} for _ in range(num_shards)]
        for layer, load in per_layer.items():
            for s, ids in enumerate(_pack(load, _replicate(load, num_replicas, num_shards), num_shards)):
                shards[s][layer] = ids
        return cls(num_experts=num_experts, layers=list(per_layer),
                   shards=[ShardExperts(experts=x) for x in shards])

    # ---- queries ---------------------------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def experts_of(self, shard: int) -> dict[int, list[int]]:
        """layer -> sorted expert ids that `shard` holds, for every layer of the plan (empty where it holds none)."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range [0, {self.num_shards})")
        return {layer: list(self.shards[shard].experts.get(layer, [])) for layer in self.layers}

    def holders(self, layer: int) -> list[list[int]]:
        """[num_experts] lists: the shard ids holding each expert of `layer`, ascending."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not one of the plan's layers {self.layers}")
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for s, shard in enumerate(self.shards):
            for e in shard.experts.get(layer, []):
                out[e].append(s)
        return out

    def _loads(self, loads: Loads) -> dict[int, list[float]]:
        per_layer = _layer_loads(loads, self.layers)
        width = len(next(iter(per_layer.values())))
        if width != self.num_experts:
            raise ValueError(f"loads have {width} experts per layer, the plan {self.num_experts}")
        return per_layer

    def shard_load(self, loads: Loads) -> dict[int, list[float]]:
        """layer -> [num_shards] tokens each shard computes, an expert's load split equally among its copies."""
        out = {}
        for layer, load in self._loads(loads).items():
            per_shard = [0.0] * self.num_shards
            for e, shards in enumerate(self.holders(layer)):
                for s in shards:
                    per_shard[s] += load[e] / len(shards)
            out[layer] = per_shard
        return out

    def balance_report(self, loads: Loads) -> BalanceReport:
        per_layer, per_shard = self._loads(loads), self.shard_load(loads)
        layers = {layer: Balance(expert_max=max(load), expert_mean=sum(load) / len(load),
                                 shard_max=max(per_shard[layer]), shard_mean=sum(load) / self.num_shards)
                  for layer, load in per_layer.items()}
        overall = Balance(**{f: sum(getattr(b, f) for b in layers.values()) for f in Balance.model_fields})
        return BalanceReport(layers=layers, overall=overall)

    # ---- file ------------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PlacementPlan:
        """Read a plan written by `save` (JSON object keys come back as int layer ids)."""
        try:
            return cls.model_validate_json(Path(path).read_text())
        except ValidationError as e:
            raise ValueError(f"{path}: {e}") from None
