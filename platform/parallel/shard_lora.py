"""Per-request LoRA on expert shards: the routed-expert factors of the router's adapter slots, on both sides.

The router reads an adapter once (`platform.engine.adapters`, the one reader) and, when it puts the adapter into
device slot s, hands the routed-expert factors of its remote layers to `AdapterSlots.put`, which keeps them (by
reference: they are the pool's host copy) under a new version. Each shard set then writes to every shard only the
experts that shard holds (`for_shard`), before any step uses slot s; a shard that restarts or joins in a re-plan
reports what it holds (`ShardLora.held`: slot -> version) and gets the slots it lacks (`missing`). Sending the
factors, rather than having each shard read the adapter folder, keeps one reader and one validation, and needs no
access to the adapter root (s3://, a router-local folder) on the shard nodes.

On the shard, `ShardLora` holds per MoE layer the stacks of `multi_lora` ([S * E_local, R, in] and
[S * E_local, out, R], adapter-major, scale folded into B; same slot numbering as the router's), allocated at the
first write, and turns the slots that came with an exchange's rows into the `ExpertLora` factors `RoutedExperts`
applies per row, exactly as the in-process path does. Rows asking for a slot the shard never got raise
`MissingLora` (a shard restarted between two steps): the router recovers, re-sends, and retries the layer.
Nothing here knows a transport.
"""
from __future__ import annotations

import itertools
import threading

import torch

from raymoe.platform.model.moe import ExpertLora
from raymoe.platform.model.multi_lora import padded_rank, write_slot

WEIGHTS = ("gate_up_proj", "down_proj")

# one layer's factors: weight -> (a [E, r, in], b [E, out, r]); one slot's: MoE layer -> that
LayerFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]
SlotFactors = dict[int, LayerFactors]


class MissingLora(RuntimeError):
    """Rows ask for an adapter slot this shard does not hold (it restarted and has not been sent it again)."""


class AdapterSlots:
    """The router's record of what each adapter slot holds for the remote routed experts: slot -> (version, the
    adapter's factors of every expert of each remote layer). Versions are unique in the process."""

    _versions = itertools.count(1)

    def __init__(self, max_loras: int, max_rank: int) -> None:
        self.max_loras, self.max_rank = max_loras, padded_rank(max_rank) if max_rank else 0
        self.slots: dict[int, tuple[int, SlotFactors]] = {}

    def put(self, slot: int, factors: SlotFactors) -> int:
        """Slot `slot` now holds `factors` (layers or weights it does not name: zeros). Returns its version."""
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"adapter slot {slot} is outside 0..{self.max_loras - 1}")
        version = next(self._versions)
        self.slots[slot] = (version, factors)
        return version

    def for_shard(self, slot: int, experts: dict[int, list[int]]) -> tuple[int, SlotFactors]:
        """(version, factors) of `slot` cut to the experts a shard holds (`experts`: layer -> sorted global ids;
        layers the slot names without weights stay named, with none)."""
        version, factors = self.slots[slot]
        out: SlotFactors = {}
        for layer, ids in experts.items():
            if ids and layer in factors:
                idx = torch.tensor(ids, dtype=torch.long)
                out[layer] = {w: (a.index_select(0, idx), b.index_select(0, idx))
                              for w, (a, b) in factors[layer].items()}
        return version, out

    def missing(self, held: dict[int, int]) -> list[int]:
        """The slots a shard holding `held` (slot -> version) must be sent."""
        return [s for s, (v, _) in sorted(self.slots.items()) if held.get(s) != v]


class ShardLora:
    """A shard's routed-expert LoRA stacks for the router's adapter slots (see the module docstring)."""

    def __init__(self, experts: dict, max_loras: int, max_rank: int, dtype: torch.dtype | None = None) -> None:
        # dtype: the stacks' (the shard's compute dtype; FP8 experts' stacks are not FP8); None: the experts'
        self.experts = experts                 # layer -> RoutedExperts (the shard's)
        self.max_loras, self.max_rank, self.dtype = max_loras, max_rank, dtype
        # layer -> weight -> (A, B); a layer's stacks are allocated at the first write that names it (the router
        # names every layer adapters reach, so the MTP module's experts never get any)
        self.stacks: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.versions: dict[int, int] = {}     # slot -> version of what it holds
        self._lock = threading.Lock()          # a shard actor is threaded: writes of several slots may overlap

    def held(self) -> dict[int, int]:
        return dict(self.versions)

    def _allocate(self, layer: int) -> None:
        S, R, ex = self.max_loras, self.max_rank, self.experts[layer]
        p = ex.gate_up_proj
        new = dict(device=p.device, dtype=self.dtype or p.dtype)
        self.stacks[layer] = {}
        for w in WEIGHTS:
            _, out_f, in_f = getattr(ex, w).shape
            self.stacks[layer][w] = (torch.zeros(S * ex.count, R, in_f, **new),
                                     torch.zeros(S * ex.count, out_f, R, **new))

    @torch.no_grad()
    def write(self, slot: int, version: int, factors: SlotFactors) -> None:
        """Overwrite `slot` with `factors` (this shard's experts only, as `AdapterSlots.for_shard` cuts them; a
        layer named with no weights, or not named: zeros)."""
        if not self.max_loras:
            raise ValueError("this expert shard was started without adapter slots (max_loras 0)")
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"adapter slot {slot} is outside 0..{self.max_loras - 1}")
        with self._lock:
            self._write(slot, version, factors)

    def _write(self, slot: int, version: int, factors: SlotFactors) -> None:
        for layer in factors:
            if layer not in self.stacks:
                if layer not in self.experts:
                    raise ValueError(f"layer {layer}: this expert shard holds none of its experts")
                self._allocate(layer)
        for layer, stacks in self.stacks.items():
            for w, (A, B) in stacks.items():
                fa, fb = factors.get(layer, {}).get(w, (None, None))
                if fa is not None:
                    if fa.shape[1] > self.max_rank:
                        raise ValueError(f"layer {layer} {w}: rank {fa.shape[1]} is above the shards' "
                                         f"max rank {self.max_rank}")
                    fa, fb = fa.to(A.device, A.dtype), fb.to(B.device, B.dtype)
                write_slot(A, B, self.experts[layer].count, slot, fa, fb)
        self.versions[slot] = version

    def factors(self, layer: int, slots: torch.Tensor | None) -> dict[str, ExpertLora] | None:
        """The per-row factors of `layer` for rows of `slots` ([n] long, -1: base); None without slots."""
        if slots is None:
            return None
        asked = set(slots[slots >= 0].unique().tolist())
        lacking = asked - set(self.versions)
        if lacking:
            raise MissingLora(f"rows ask for adapter slots {sorted(lacking)} this expert shard does not hold")
        stacks = self.stacks.get(layer)
        if stacks is None:                     # a layer no adapter reaches: its base experts
            return None
        return {w: ExpertLora(a, b, 1.0, slots) for w, (a, b) in stacks.items()}
