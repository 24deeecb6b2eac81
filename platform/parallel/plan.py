"""PlacementPlan: which expert shard holds which routed experts of which MoE layer.

Contiguous ranges by default; or balanced from measured expert loads as DeepSeek's EPLB does: the hottest experts
get extra replicas (one at a time, to the expert with the highest load per replica), then replicas are packed onto
shards heaviest first, each onto the least-loaded shard with a free slot that holds no replica of the same expert.
Saved and loaded as JSON. Pure data: no Ray, no torch.distributed, no model code.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ShardExperts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experts: dict[int, list[int]] = Field(default_factory=dict)    # layer -> sorted global expert ids


class PlacementPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_experts: int = Field(gt=0)
    layers: list[int]
    shards: list[ShardExperts] = Field(min_length=1)

    @model_validator(mode="after")
    def _covers(self) -> "PlacementPlan":
        layers = set(self.layers)
        for s, shard in enumerate(self.shards):
            for layer, ids in shard.experts.items():
                if layer not in layers:
                    raise ValueError(f"shard {s} holds experts of layer {layer}, which the plan does not cover")
                if len(set(ids)) != len(ids):
                    raise ValueError(f"shard {s} lists an expert of layer {layer} twice")
                bad = [e for e in ids if not 0 <= e < self.num_experts]
                if bad:
                    raise ValueError(f"shard {s}: expert {bad[0]} of layer {layer} is outside 0..{self.num_experts - 1}")
                shard.experts[layer] = sorted(ids)
        for layer in self.layers:
            held = set().union(*(set(sh.experts.get(layer, ())) for sh in self.shards))
            missing = sorted(set(range(self.num_experts)) - held)
            if missing:
                raise ValueError(f"expert {missing[0]} of layer {layer} is held by no shard")
        return self

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def experts_of(self, shard: int) -> dict[int, list[int]]:
        return self.shards[shard].experts

    def holders(self, layer: int) -> list[list[int]]:
        """For each expert of `layer`, the shards holding it."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for s, shard in enumerate(self.shards):
            for e in shard.experts.get(layer, ()):
                out[e].append(s)
        return out

    @classmethod
    def contiguous(cls, num_shards: int, layers: list[int], num_experts: int) -> "PlacementPlan":
        """Shard s holds experts [s * E / N, (s + 1) * E / N) of every layer (the first E % N shards one more)."""
        if not 0 < num_shards <= num_experts:
            raise ValueError(f"{num_shards} shards for {num_experts} experts: need 1..{num_experts} shards")
        base, extra = divmod(num_experts, num_shards)
        shards, start = [], 0
        for s in range(num_shards):
            n = base + (s < extra)
            shards.append(ShardExperts(experts={layer: list(range(start, start + n)) for layer in layers}))
            start += n
        return cls(num_experts=num_experts, layers=list(layers), shards=shards)

    @classmethod
    def balanced(cls, loads: dict[int, list[float]], num_shards: int, num_replicas: int = 0) -> "PlacementPlan":
        """EPLB-style plan from measured loads ({layer: tokens per expert}), `num_replicas` extra replicas per
        layer. Deterministic: ties go to the lower index."""
        layers = sorted(loads)
        num_experts = len(loads[layers[0]])
        slots = -(-(num_experts + num_replicas) // num_shards)
        if num_replicas and num_shards < 2:
            raise ValueError("replicas need at least 2 shards")
        shards: list[dict[int, list[int]]] = [{} for _ in range(num_shards)]
        for layer in layers:
            load = [float(x) for x in loads[layer]]
            if len(load) != num_experts:
                raise ValueError(f"layer {layer} has {len(load)} expert loads, expected {num_experts}")
            count = [1] * num_experts
            for _ in range(num_replicas):
                e = max(range(num_experts), key=lambda i: (load[i] / count[i], -i))
                count[e] += 1
            replicas = sorted(((load[e] / count[e], e) for e in range(num_experts) for _ in range(count[e])),
                              key=lambda r: (-r[0], r[1]))
            filled, used = [0.0] * num_shards, [0] * num_shards
            for share, e in replicas:
                ok = [s for s in range(num_shards) if used[s] < slots and e not in shards[s].get(layer, [])]
                if not ok:
                    raise ValueError(f"layer {layer}: cannot place {count[e]} replicas of expert {e} on "
                                     f"{num_shards} shards")
                s = min(ok, key=lambda i: (filled[i], i))
                shards[s].setdefault(layer, []).append(e)
                filled[s] += share
                used[s] += 1
        return cls(num_experts=num_experts, layers=layers, shards=[ShardExperts(experts=s) for s in shards])

    def shard_load(self, loads: dict[int, list[float]]) -> dict[int, list[float]]:
        """{layer: load of each shard}, an expert's load shared equally by its replicas."""
        out = {}
        for layer in self.layers:
            holders = self.holders(layer)
            per = [0.0] * self.num_shards
            for e, hs in enumerate(holders):
                for s in hs:
                    per[s] += float(loads[layer][e]) / len(hs)
            out[layer] = per
        return out

    def balance_report(self, loads: dict[int, list[float]]) -> "BalanceReport":
        rows = []
        shard_loads = self.shard_load(loads)
        for layer in self.layers:
            ex = [float(x) for x in loads[layer]]
            sh = shard_loads[layer]
            rows.append(LayerBalance(layer=layer, expert_max_over_mean=_ratio(ex), shard_max_over_mean=_ratio(sh)))
        return BalanceReport(layers=rows)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "PlacementPlan":
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{p}: placement plan file not found")
        return cls.model_validate_json(p.read_text())


def _ratio(xs: list[float]) -> float:
    mean = sum(xs) / len(xs) if xs else 0.0
    return max(xs) / mean if mean > 0 else 1.0


class LayerBalance(BaseModel):
    layer: int
    expert_max_over_mean: float
    shard_max_over_mean: float


class BalanceReport(BaseModel):
    layers: list[LayerBalance]

    @property
    def shard_max_over_mean(self) -> float:
        return max((r.shard_max_over_mean for r in self.layers), default=1.0)

    def table(self) -> str:
        lines = ["layer  experts max/mean  shards max/mean"]
        lines += [f"{r.layer:>5}  {r.expert_max_over_mean:>16.3f}  {r.shard_max_over_mean:>15.3f}" for r in self.layers]
        return "\n".join(lines)
