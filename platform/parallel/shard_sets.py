"""Shard sets: the shards serving one placement plan, behind one transport.

A set sends one layer's batch to the shards that have work in it (`send(layer, x, ids, w, owner, hit)` -> handle;
`owner` [N, k] says which shard computes each (token, expert) pair, `hit` which shards own any) and returns the sum
of their outputs (`wait` -> [N, H]): each shard computes its own pairs (ids masked to -1 elsewhere) and sums their
weighted outputs itself, so the router only adds one [N, H] per shard, in fp32. It never routes.
`LocalShards` holds `ExpertShard` objects in the router's process (the numerical reference). `RayShards` runs each
as a Ray actor (restarted by Ray when it dies; it reloads its experts) and exchanges rows by actor calls.
`CollectiveShards` places the same actors but moves rows over a gloo group formed among router (rank 0) and shards:
Ray passes the rendezvous and supervises. A failed exchange raises `ShardFailure`; `recover` waits for every shard
to answer again (and re-forms the group). Sets built for a new plan reuse the actors whose experts did not change.
Per-request adapters: the rows' adapter slots travel with the rows (`slots` [N], None when no adapters are bound);
`write_lora(slot)` writes what the router's `AdapterSlots` holds for a slot to every shard (only its experts), and
`sync_lora()` sends each shard the slots it lacks (a restarted or new shard): `recover` does it before the layer
is sent again, and a re-plan before the new set serves.
"""
from __future__ import annotations

import logging
import socket
import time
from datetime import timedelta

import torch

from raymoe.platform.config import ParallelConfig
from raymoe.platform.parallel.plan import PlacementPlan
from raymoe.platform.parallel.shard import (HEADER_BYTES, OP_COMPUTE, OP_RESIZE, OP_STOP, ExpertShard, control,
                                            message_bytes, pack)
from raymoe.platform.parallel.shard_lora import AdapterSlots, MissingLora

log = logging.getLogger(__name__)


class ShardFailure(RuntimeError):
    """A shard did not answer an exchange (died, restarting, or its data plane broke)."""

    def __init__(self, shard: int, cause: BaseException | str) -> None:
        super().__init__(f"expert shard {shard}: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}")
        self.shard = shard


class ExpertsUnavailable(RuntimeError):
    """Expert shards did not come back within the step deadline: the step's requests fail, the router lives on."""


def mine(ids: torch.Tensor, owner: torch.Tensor, shard: int) -> torch.Tensor:
    """The expert ids shard `shard` computes ([N, k]; -1 for pairs another shard owns)."""
    return torch.where(owner == shard, ids, -1)


def combine(ys: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """The shards' partial outputs (S x [N, H], or stacked [S, N, H]) summed in fp32, in their dtype."""
    if len(ys) == 1:
        return ys[0]
    stacked = ys if isinstance(ys, torch.Tensor) else torch.stack(ys)
    return stacked.sum(0, dtype=torch.float32).to(stacked.dtype)


class LocalShards:
    """Every shard an in-process ExpertShard: `send` computes at once."""

    def __init__(self, path: str, plan: PlacementPlan, cfg: ParallelConfig, dtype: str, device: str,
                 reuse: "LocalShards | None" = None, placement=None, quantization: str = "none",
                 lora: AdapterSlots | None = None) -> None:
        self.plan, self.lora = plan, lora or AdapterSlots(0, 0)
        old = {_key(s): sh for s, sh in zip(reuse.plan.shards, reuse.shards)} if reuse else {}
        self.shards = [old.get(_key(s)) or ExpertShard(path, s.experts, dtype, device, None, quantization,
                                                       self.lora.max_loras, self.lora.max_rank) for s in plan.shards]

    def send(self, layer: int, x, ids, w, owner, hit: list[int], slots=None):
        return [self.shards[s].compute(layer, x, mine(ids, owner, s), w, slots) for s in hit]

    def wait(self, handle) -> torch.Tensor:
        return combine(handle)

    def write_lora(self, slot: int) -> None:
        for sh, s in zip(self.shards, self.plan.shards):
            sh.write_lora(slot, *self.lora.for_shard(slot, s.experts))

    def sync_lora(self) -> None:
        for sh, s in zip(self.shards, self.plan.shards):
            for slot in self.lora.missing(sh.held_lora()):
                sh.write_lora(slot, *self.lora.for_shard(slot, s.experts))

    def activate(self) -> None: ...
    def deactivate(self) -> None: ...
    def recover(self, deadline: float) -> None: ...
    def close(self, keep: "LocalShards | None" = None) -> None: ...

    def keys_read(self) -> list[list[str]]:
        return [s.keys_read() for s in self.shards]


def _key(shard) -> tuple:
    return tuple(sorted((layer, tuple(ids)) for layer, ids in shard.experts.items() if ids))


class RayShards:
    """Every shard a Ray actor (`ExpertShard` remote, restarted forever by Ray); rows travel as actor calls."""

    def __init__(self, path: str, plan: PlacementPlan, cfg: ParallelConfig, dtype: str, device: str,
                 reuse: "RayShards | None" = None, placement=None, quantization: str = "none",
                 lora: AdapterSlots | None = None) -> None:
        import ray
        self.plan, self.cfg, self.lora = plan, cfg, lora or AdapterSlots(0, 0)
        self.shard_device = "cuda" if cfg.gpus_per_shard > 0 else "cpu"
        self.placement = placement
        old = ({_key(s): (a, b) for s, a, b in zip(reuse.plan.shards, reuse.actors, reuse.bundles)}
               if reuse else {})
        self.actors, self.bundles = [], []
        for s in plan.shards:
            actor, bundle = old.get(_key(s), (None, None))
            if actor is None:
                opts = dict(num_cpus=cfg.cpus_per_shard, num_gpus=cfg.gpus_per_shard, max_restarts=-1,
                            max_task_retries=0, max_concurrency=4)
                if placement is not None:
                    extra, bundle = placement.acquire()
                    opts.update(extra)
                threads = max(1, int(cfg.cpus_per_shard)) if self.shard_device == "cpu" else None
                actor = ray.remote(ExpertShard).options(**opts).remote(path, s.experts, dtype, self.shard_device,
                                                                        threads, quantization, self.lora.max_loras,
                                                                        self.lora.max_rank)
            self.actors.append(actor)
            self.bundles.append(bundle)
        try:                                                       # loaded (raises if a shard cannot load)
            ray.get([a.ping.remote() for a in self.actors], timeout=cfg.shard_start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close(keep=reuse)
            raise RuntimeError(f"expert shards did not start within {cfg.shard_start_timeout_s:g} s (not enough "
                               f"free resources for {len(self.actors)} shards?)") from None

    def send(self, layer: int, x, ids, w, owner, hit: list[int], slots=None):
        xc, idc, wc, oc = x.cpu(), ids.cpu(), w.cpu(), owner.cpu()
        sc = None if slots is None else slots.cpu()
        return [(s, self.actors[s].compute.remote(layer, xc, mine(idc, oc, s), wc, sc)) for s in hit], x.device

    def wait(self, handle) -> torch.Tensor:
        import ray
        refs, device = handle
        ys = []
        for shard, ref in refs:
            try:
                ys.append(ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, MissingLora) as e:
                raise ShardFailure(shard, e) from e          # (MissingLora: restarted between two steps)
        return combine(ys).to(device, non_blocking=True)

    def activate(self) -> None: ...
    def deactivate(self) -> None: ...

    def write_lora(self, slot: int) -> None:
        """Every live shard gets `slot`'s factors before this returns; a dead one gets them when it is back
        (`sync_lora` in `recover`), and until then refuses rows of that slot (MissingLora)."""
        import ray
        refs = [a.write_lora.remote(slot, *self.lora.for_shard(slot, s.experts))
                for a, s in zip(self.actors, self.plan.shards)]
        for i, ref in enumerate(refs):
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                log.warning("adapter slot %d not written to expert shard %d (%s): sent when it is back", slot, i,
                            str(e).splitlines()[0])

    def sync_lora(self) -> None:
        """Send each shard the slots it lacks (all of them after a restart; none for a shard that kept them)."""
        import ray
        if not self.lora.slots:
            return
        held = ray.get([a.held_lora.remote() for a in self.actors])
        refs = [a.write_lora.remote(slot, *self.lora.for_shard(slot, s.experts))
                for a, s, h in zip(self.actors, self.plan.shards, held) for slot in self.lora.missing(h)]
        ray.get(refs)

    def recover(self, deadline: float) -> None:
        """Wait until every shard answers (Ray restarts a dead one, which reloads its experts), then send the
        shards the adapter slots they lack."""
        import ray
        while True:
            self._answering(deadline)
            try:
                self.sync_lora()
                return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                log.warning("re-sending adapters to the expert shards: %s", str(e).splitlines()[0])

    def _answering(self, deadline: float) -> None:
        import ray
        for i, a in enumerate(self.actors):
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ExpertsUnavailable(f"expert shard {i} of {len(self.actors)} did not come back within the "
                                             f"step deadline ({self.cfg.step_deadline_s:g} s)")
                try:
                    ray.get(a.ping.remote(), timeout=min(left, 5.0))
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.GetTimeoutError):
                    time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def close(self, keep: "RayShards | None" = None) -> None:
        import ray
        kept = {id(a) for a in keep.actors} if keep else set()
        for a, bundle in zip(self.actors, self.bundles):
            if id(a) not in kept:
                ray.kill(a, no_restart=True)
                if self.placement is not None:
                    self.placement.release(bundle)

    def keys_read(self) -> list[list[str]]:
        import ray
        return ray.get([a.keys_read.remote() for a in self.actors])


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class CollectiveShards(RayShards):
    """The shard actors of `RayShards`, with rows moving over a gloo group: router rank 0, shard i rank i + 1.
    One exchange: the layer's whole batch as one message to each shard with work (`shard.pack`), one [N, H] back;
    receives are posted before the sends, and each shard's next receive is posted as soon as it has replied, so a
    message never waits for its receiver (`expect[i]`: the rows shard i's posted receive is sized for)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.loops: list = []
        self.active = False                  # the gloo group is formed
        self.broken = False                  # an exchange failed: the protocol state is unknown until recover()
        self.expect: list[int] = []
        self._h, self._k, self._dtype = 0, 0, torch.float32     # the row format of the last exchange

    def activate(self) -> None:
        import ray
        import torch.distributed as dist
        host = ray.util.get_node_ip_address()
        init = f"tcp://{host}:{_free_port(host)}"
        world = len(self.actors) + 1
        timeout = 24 * 3600.0                 # idle shards wait in recv between steps: no timeout while idle
        self.loops = [a.serve_collective.remote(init, i + 1, world, timeout) for i, a in enumerate(self.actors)]
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=world,
                                timeout=timedelta(seconds=self.cfg.step_deadline_s))
        self.expect = [0] * len(self.actors)            # every shard starts with a bare header's receive posted
        self.active, self.broken = True, False

    def deactivate(self, wait_s: float | None = None) -> None:
        """Stop every live shard's loop (a stop message each; a dead one's send fails) and leave the group."""
        import ray
        import torch.distributed as dist
        if not self.active:
            return
        self.active = False
        for i, n in enumerate(self.expect):
            try:
                dist.send(control(OP_STOP, 0, 0, self._size(n)), dst=i + 1)
            except RuntimeError as e:                  # that shard is gone: its loop is gone too
                log.info("stopping shard %d's collective loop: %s", i, str(e).splitlines()[0])
        dist.destroy_process_group()
        try:
            ray.get(self.loops, timeout=self.cfg.step_deadline_s if wait_s is None else wait_s)
        except Exception as e:                         # noqa: BLE001 - a dead shard's loop; recover() handles it
            log.info("collective loops ended with: %s", str(e).splitlines()[0])

    def _size(self, n: int) -> int:
        return message_bytes(n, self._h, self._k, self._dtype) if n else HEADER_BYTES

    def send(self, layer: int, x, ids, w, owner, hit: list[int], slots=None):
        import torch.distributed as dist
        if not self.active or self.broken:
            raise ShardFailure(hit[0], "the collective group is down")
        n, k = ids.shape
        self._h, self._k, self._dtype = x.shape[1], k, x.dtype
        shard = hit[0]
        try:
            msg = pack(OP_COMPUTE, layer, x, ids, w, owner, slots)
            ys = torch.empty(len(hit), n, x.shape[1], dtype=x.dtype)
            works = [(s, dist.irecv(ys[j], src=s + 1)) for j, s in enumerate(hit)]
            sent = [msg]
            for s in hit:
                shard = s
                if self.expect[s] != n:                # resize the shard's posted receive first
                    sent.append(control(OP_RESIZE, n, k, self._size(self.expect[s])))
                    works.append((s, dist.isend(sent[-1], dst=s + 1)))
                    self.expect[s] = n
                works.append((s, dist.isend(msg, dst=s + 1)))
        except RuntimeError as e:
            self.broken = True                         # recover() re-forms the group
            raise ShardFailure(shard, e) from e
        return works, sent, ys, x.device

    def wait(self, handle) -> torch.Tensor:
        works, _sent, ys, dev = handle                # (_sent: kept alive until the sends complete)
        for shard, wk in works:
            try:
                wk.wait()
            except RuntimeError as e:
                self.broken = True
                raise ShardFailure(shard, e) from e
        return combine(ys).to(dev, non_blocking=True)

    def recover(self, deadline: float) -> None:
        """Tear the group down (the live shards' loops stop), wait for every shard to answer (a dead one restarts),
        form a new group."""
        self.deactivate(wait_s=max(0.1, deadline - time.monotonic()))
        super().recover(deadline)
        self.activate()

    def close(self, keep: "RayShards | None" = None) -> None:
        self.deactivate()
        super().close(keep)


SHARD_SETS = {"local": LocalShards, "ray": RayShards, "collective": CollectiveShards}
