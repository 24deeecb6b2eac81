"""The engine's LoRA adapters: which are loaded, which are in host memory, which hold a device slot.

Owns the names (`load` / `unload`), the host copies of their factors (up to `max_cpu_loras` beyond the resident
ones, least recently used dropped and read from disk again when needed) and the `max_loras` device slots of the
model's per-row LoRA stacks (`platform.model.multi_lora`): a running sequence pins its adapter's slot, so an
adapter is evicted (least recently used first) only when no running sequence uses it, and a running request is
never touched by a load, an eviction or an unload (an unload waits for the requests that use the adapter).
Adapters are read and checked against the model by the one reader, `platform.checkpoint.adapter`. Routed experts
that live on expert shards get their factors through `remote` (the engine's `ExpertParallel`), written when the
adapter takes a slot, before any step uses it. Never touches the scheduler's queues or the cache blocks.
"""
from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raymoe.platform.checkpoint.adapter import adapter_targets, expert_factors, read_adapter
from raymoe.platform.checkpoint.reader import CheckpointError
from raymoe.platform.model import DeepseekV3ForCausalLM
from raymoe.platform.model.multi_lora import RowLora, install

_keys = itertools.count(1)     # load ids, unique in the process (0: the base model)


class AdapterNotFound(LookupError):
    """No adapter of that name is loaded."""


class AdapterInvalid(ValueError):
    """An adapter that cannot be served: missing files, a rank above max_lora_rank, targets or shapes that are not
    the base model's. The message names the adapter and what is wrong."""


@dataclass
class _Adapter:
    name: str
    path: Path
    key: int                                     # load id: keys the prefix cache
    rank: int
    targets: list[str]
    users: int = 0                               # unfinished sequences that asked for it
    closing: bool = False                        # unloaded while in use: gone when the last user finishes
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)


class AdapterPool:
    def __init__(self, model: DeepseekV3ForCausalLM, max_loras: int, max_cpu_loras: int, max_rank: int,
                 remote=None) -> None:
        # remote: where the factors of routed experts on expert shards go (`write_lora(slot, factors)`), or None
        self.model, self.remote = model, remote
        self.max_loras, self.max_cpu_loras, self.max_rank = max_loras, max_cpu_loras, max_rank
        self.lora: RowLora | None = None             # the model's stacks, made at the first load
        self.adapters: dict[str, _Adapter] = {}
        self.host: OrderedDict[str, None] = OrderedDict()          # names whose factors are in host memory, LRU
        self.slot_of: dict[str, int] = {}
        self.resident: OrderedDict[str, None] = OrderedDict()      # names holding a slot, least recent first
        self.pins: Counter[int] = Counter()                        # running sequences per slot
        self.loads = self.evictions = self.disk_reads = 0

    # ---- names ---------------------------------------------------------------------------------------------------
    def load(self, name: str, path: str | Path) -> dict:
        """Read and check the adapter at `path` and register it as `name`; returns {"name", "rank", "targets"}."""
        if not name or not isinstance(name, str):
            raise AdapterInvalid("an adapter needs a non-empty name")
        if name in self.adapters:
            raise AdapterInvalid(f"adapter {name!r} is already loaded (unload it first)")
        factors, rank = self._read(name, Path(path))
        a = _Adapter(name, Path(path), next(_keys), rank, sorted(factors), factors=factors)
        self.adapters[name] = a
        self._cache(a)
        return {"name": name, "rank": rank, "targets": a.targets}

    def unload(self, name: str) -> None:
        """Forget `name`: new requests cannot ask for it; requests already using it finish with it first."""
        a = self._get(name)
        a.closing = True
        if a.users == 0:
            self._drop(a)

    def names(self) -> list[str]:
        return sorted(n for n, a in self.adapters.items() if not a.closing)

    def key(self, name: str) -> int:
        """The load id of a loaded adapter (AdapterNotFound otherwise)."""
        return self._get(name).key

    # ---- sequences -----------------------------------------------------------------------------------------------
    def use(self, name: str) -> int:
        """A new sequence asks for `name`: counts it and returns the adapter's key."""
        a = self._get(name)
        a.users += 1
        return a.key

    def done(self, name: str) -> None:
        """A sequence that asked for `name` finished (or was aborted)."""
        a = self.adapters[name]
        a.users -= 1
        if a.closing and a.users == 0:
            self._drop(a)

    def acquire(self, name: str) -> int | None:
        """A device slot holding `name`, pinned for one running sequence; None when every slot is pinned by
        sequences of other adapters (the sequence waits)."""
        a = self.adapters[name]
        slot = self.slot_of.get(name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self._write(slot, self._factors(a))
            self.slot_of[name] = slot
            self.loads += 1
        self.resident[name] = None
        self.resident.move_to_end(name)
        self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.pins[slot] -= 1

    def stats(self) -> dict:
        return {"loaded": self.names(), "resident": [n for n in self.resident], "max_loras": self.max_loras,
                "loads": self.loads, "evictions": self.evictions, "disk_reads": self.disk_reads,
                "host_cached": len(self.host)}

    # ---- internals -----------------------------------------------------------------------------------------------
    def _write(self, slot: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put an adapter into `slot`: the model's stacks, and the expert shards' for remote routed experts."""
        self.lora.write(slot, factors)
        if self.lora.remote:
            by_layer: dict[int, dict] = {layer: {} for layer, _ in self.lora.remote.values()}   # all: zeros
            for pname, (layer, w) in self.lora.remote.items():
                if pname in factors:
                    by_layer[layer][w] = factors[pname]
            self.remote.write_lora(slot, by_layer)

    def _get(self, name: str) -> _Adapter:
        a = self.adapters.get(name)
        if a is None or a.closing:
            known = ", ".join(self.names()) or "none"
            raise AdapterNotFound(f"adapter {name!r} is not loaded (loaded: {known})")
        return a

    def _free_slot(self) -> int | None:
        used = set(self.slot_of.values())
        free = [s for s in range(self.max_loras) if s not in used]
        if free:
            return free[0]
        for victim in self.resident:                     # least recently used first
            slot = self.slot_of[victim]
            if self.pins[slot] == 0:
                del self.resident[victim], self.slot_of[victim]
                self.evictions += 1
                return slot
        return None

    def _drop(self, a: _Adapter) -> None:
        del self.adapters[a.name]
        self.host.pop(a.name, None)
        a.factors = None
        slot = self.slot_of.pop(a.name, None)
        self.resident.pop(a.name, None)
        if slot is not None:                             # no sequence pins it (it has no users): zero the slot
            self.lora.write(slot, {})

    def _cache(self, a: _Adapter) -> None:
        """Keep `a`'s factors in host memory; drop those of the least recently used beyond the budget (adapters
        resident on the device do not count)."""
        self.host[a.name] = None
        self.host.move_to_end(a.name)
        spare = [n for n in self.host if n not in self.slot_of and n != a.name]
        while len([n for n in self.host if n not in self.slot_of]) > self.max_cpu_loras and spare:
            victim = spare.pop(0)
            del self.host[victim]
            self.adapters[victim].factors = None

    def _factors(self, a: _Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if a.factors is None:                            # dropped from host memory: read it again
            a.factors, _ = self._read(a.name, a.path)
            self.disk_reads += 1
        self._cache(a)
        return a.factors

    def _read(self, name: str, path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
        """The adapter's factors per target weight, in the stacks' layout (scale folded into b), and its rank."""
        try:
            adapter = read_adapter(path)
            targets = adapter_targets(self.model, adapter)
        except (CheckpointError, OSError) as e:
            raise AdapterInvalid(f"adapter {name!r}: {e}") from None
        except KeyError as e:
            raise AdapterInvalid(f"adapter {name!r}: {path}/adapter_config.json lacks {e}") from None
        if adapter.replaced:
            raise AdapterInvalid(f"adapter {name!r}: replaces base tensors (modules_to_save: "
                                 f"{', '.join(sorted(adapter.replaced)[:3])}), which a shared batch cannot serve")
        if not targets:
            raise AdapterInvalid(f"adapter {name!r}: {path} holds no LoRA factors")
        if self.lora is None:
            self.lora = install(self.model, self.max_loras, self.max_rank)
            if self.lora.remote and self.remote is None:
                raise AdapterInvalid("this model's routed experts are remote but the engine gave the adapter pool "
                                     "no expert shards to write them to")
        dtype = next(self.model.parameters()).dtype
        out, rank = {}, 0
        for pname, f, experts in targets:
            a, b = (f.A, f.B) if experts == 1 else expert_factors(f.A, f.B, experts)   # [(E,) r, in], [(E,) out, r]
            r = a.shape[-2]
            if r > self.max_rank:
                raise AdapterInvalid(f"adapter {name!r}: rank {r} of {f.module} is above max_lora_rank "
                                     f"{self.max_rank}")
            if pname not in self.lora.stacks and pname not in self.lora.remote:
                raise AdapterInvalid(f"adapter {name!r}: {pname} is a weight per-request adapters do not reach "
                                     f"(MTP modules); not supported")
            out[pname] = (a.to(dtype), (b.float() * f.scaling).to(dtype))
            rank = max(rank, r)
        return out, rank
