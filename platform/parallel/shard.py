"""ExpertShard: the routed experts of some (MoE layer, expert) pairs, and the computation over rows sent to it.

Loaded straight from the checkpoint (only its own experts' tensors are read) and stateless between steps: a shard
can be restarted, added or moved by loading again. Runs as a plain object (the in-process transport) or as a Ray
actor (`ShardActor`), where it may also serve a torch.distributed data plane (`serve_collective`). It never
decides routing or placement.
"""
from __future__ import annotations

import logging
import threading
from datetime import timedelta

import torch

log = logging.getLogger(__name__)

# one collective exchange: a header [op, layer, rows, k], then x, ids and w packed as one byte buffer
OP_COMPUTE, OP_STOP = 1, 0


def pack(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [n, H], ids [n, k] long, w [n, k] fp32 -> one uint8 buffer (one message instead of three)."""
    return torch.cat([t.contiguous().view(torch.uint8).flatten() for t in (x, ids, w.float())])


def unpack(buf: torch.Tensor, n: int, h: int, k: int, dtype: torch.dtype):
    """The inverse of `pack`."""
    sizes = (n * h * torch.empty((), dtype=dtype).element_size(), n * k * 8, n * k * 4)
    x, ids, w = buf.split(sizes)
    return x.view(dtype).view(n, h), ids.view(torch.long).view(n, k), w.view(torch.float32).view(n, k)


def packed_bytes(n: int, h: int, k: int, dtype: torch.dtype) -> int:
    return n * h * torch.empty((), dtype=dtype).element_size() + n * k * 12


class ExpertShard:
    def __init__(self, path: str, experts: dict[int, list[int]], dtype: str = "float32",
                 device: str = "cpu", threads: int | None = None) -> None:
        from raymoe.platform.checkpoint.experts import load_experts
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        held = {layer: ids for layer, ids in experts.items() if ids}
        self.experts, self._keys = load_experts(path, held, self.dtype, self.device)
        self._collective = threading.Lock()       # one data-plane loop at a time

    def ping(self) -> bool:
        return True

    def keys_read(self) -> list[str]:
        """The checkpoint tensors this shard read when it loaded."""
        return sorted(self._keys)

    @torch.inference_mode()
    def compute(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        # x: [n, H]; topk_ids, topk_w: [n, k] (id -1: an expert some other shard computes) -> [n, H] on x's device
        dev = x.device
        y = self.experts[layer](x.to(self.device, self.dtype), topk_ids.to(self.device), topk_w.to(self.device))
        return y.to(dev)

    def serve_collective(self, init_method: str, rank: int, world: int, timeout_s: float) -> int:
        """Join the replica's gloo group as `rank` and compute exchanges until the router says stop or the group
        breaks. Returns how many exchanges it served."""
        import torch.distributed as dist
        with self._collective:
            dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
            served = 0
            try:
                header = torch.empty(4, dtype=torch.long)
                while True:
                    dist.recv(header, src=0)
                    op, layer, n, k = header.tolist()
                    if op == OP_STOP:
                        break
                    h = self.experts[layer].gate_up_proj.shape[2]
                    buf = torch.empty(packed_bytes(n, h, k, self.dtype), dtype=torch.uint8)
                    dist.recv(buf, src=0)
                    dist.send(self.compute(layer, *unpack(buf, n, h, k, self.dtype)).contiguous(), dst=0)
                    served += 1
            except RuntimeError as e:                     # the router went away or re-forms the group
                log.info("collective loop of rank %d ended: %s", rank, str(e).splitlines()[0])
            finally:
                dist.destroy_process_group()
            return served
