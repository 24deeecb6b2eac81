"""Shard sets: the shards serving one placement plan, behind one transport.

A set sends one shard the rows of one layer (`send` -> handle) and returns its output (`wait`); it never routes.
`LocalShards` holds `ExpertShard` objects in the router's process (the numerical reference). `RayShards` runs each
as a Ray actor (restarted by Ray when it dies; it reloads its experts) and exchanges rows by actor calls.
`CollectiveShards` places the same actors but moves rows over a gloo group formed among router (rank 0) and shards:
Ray passes the rendezvous and supervises. A failed exchange raises `ShardFailure`; `recover` waits for every shard
to answer again (and re-forms the group). Sets built for a new plan reuse the actors whose experts did not change.
"""
from __future__ import annotations

import logging
import socket
import time
from datetime import timedelta

import torch

from raymoe.platform.config import ParallelConfig
from raymoe.platform.parallel.plan import PlacementPlan
from raymoe.platform.parallel.shard import OP_COMPUTE, OP_STOP, ExpertShard, pack

log = logging.getLogger(__name__)


class ShardFailure(RuntimeError):
    """A shard did not answer an exchange (died, restarting, or its data plane broke)."""

    def __init__(self, shard: int, cause: BaseException | str) -> None:
        super().__init__(f"expert shard {shard}: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}")
        self.shard = shard


class ExpertsUnavailable(RuntimeError):
    """Expert shards did not come back within the step deadline: the step's requests fail, the router lives on."""


class LocalShards:
    """Every shard an in-process ExpertShard: `send` computes at once."""

    def __init__(self, path: str, plan: PlacementPlan, cfg: ParallelConfig, dtype: str, device: str,
                 reuse: "LocalShards | None" = None, placement=None) -> None:
        self.plan = plan
        old = {_key(s): sh for s, sh in zip(reuse.plan.shards, reuse.shards)} if reuse else {}
        self.shards = [old.get(_key(s)) or ExpertShard(path, s.experts, dtype, device) for s in plan.shards]

    def send(self, shard: int, layer: int, x, ids, w):
        return self.shards[shard].compute(layer, x, ids, w)

    def wait(self, handle) -> torch.Tensor:
        return handle

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
                 reuse: "RayShards | None" = None, placement=None) -> None:
        import ray
        self.plan, self.cfg = plan, cfg
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
                                                                        threads)
            self.actors.append(actor)
            self.bundles.append(bundle)
        try:                                                       # loaded (raises if a shard cannot load)
            ray.get([a.ping.remote() for a in self.actors], timeout=cfg.shard_start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close(keep=reuse)
            raise RuntimeError(f"expert shards did not start within {cfg.shard_start_timeout_s:g} s (not enough "
                               f"free resources for {len(self.actors)} shards?)") from None

    def send(self, shard: int, layer: int, x, ids, w):
        return shard, self.actors[shard].compute.remote(layer, x.cpu(), ids.cpu(), w.cpu()), x.device

    def wait(self, handle) -> torch.Tensor:
        import ray
        shard, ref, device = handle
        try:
            return ray.get(ref).to(device, non_blocking=True)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise ShardFailure(shard, e) from e

    def activate(self) -> None: ...
    def deactivate(self) -> None: ...

    def recover(self, deadline: float) -> None:
        """Wait until every shard answers (Ray restarts a dead one, which reloads its experts)."""
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
    One exchange: a header [op, layer, rows, k] and x, ids, w packed in one buffer to the shard; its output back."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.loops: list = []
        self.active = False

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
        self.active = True

    def deactivate(self, wait_s: float | None = None) -> None:
        """Stop every live shard's loop (a stop header each; a dead one's send fails) and leave the group."""
        import ray
        import torch.distributed as dist
        if not self.active:
            return
        self.active = False
        stop = torch.tensor([OP_STOP, 0, 0, 0], dtype=torch.long)
        for i in range(len(self.actors)):
            try:
                dist.send(stop, dst=i + 1)
            except RuntimeError as e:                  # that shard is gone: its loop is gone too
                log.info("stopping shard %d's collective loop: %s", i, str(e).splitlines()[0])
        dist.destroy_process_group()
        try:
            ray.get(self.loops, timeout=self.cfg.step_deadline_s if wait_s is None else wait_s)
        except Exception as e:                         # noqa: BLE001 - a dead shard's loop; recover() handles it
            log.info("collective loops ended with: %s", str(e).splitlines()[0])

    def send(self, shard: int, layer: int, x, ids, w):
        import torch.distributed as dist
        if not self.active:
            raise ShardFailure(shard, "the collective group is down")
        n, k = ids.shape
        dev = x.device
        try:
            header = torch.tensor([OP_COMPUTE, layer, n, k], dtype=torch.long)
            tensors = [header, pack(x.cpu(), ids.cpu(), w.cpu())]
            works = [dist.isend(t, dst=shard + 1) for t in tensors]
            y = torch.empty(n, x.shape[1], dtype=x.dtype)
            works.append(dist.irecv(y, src=shard + 1))
        except RuntimeError as e:
            raise ShardFailure(shard, e) from e
        return shard, works, tensors, y, dev

    def wait(self, handle) -> torch.Tensor:
        shard, works, _tensors, y, dev = handle       # (_tensors: kept alive until their sends complete)
        try:
            for wk in works:
                wk.wait()
        except RuntimeError as e:
            raise ShardFailure(shard, e) from e
        return y.to(dev, non_blocking=True)

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
