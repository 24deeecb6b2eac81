"""ExpertShard: the routed experts of some (MoE layer, expert) pairs, and the computation over rows sent to it.

Loaded straight from the checkpoint (only its own experts' tensors are read) and stateless between steps: a shard
can be restarted, added or moved by loading again (the router then re-sends its adapters' factors, `shard_lora`). Runs as a plain object (the in-process transport) or as a Ray
actor (`ShardActor`), where it may also serve a torch.distributed data plane (`serve_collective`). It never
decides routing or placement.
"""
from __future__ import annotations

import logging
import threading
from datetime import timedelta

import torch

from raymoe.platform.parallel.shard_lora import ShardLora

log = logging.getLogger(__name__)

# one collective exchange, router -> shard: one message [op, layer, n, k, lora] + ids, owner, w [n, k] + slots [n]
# + x [n, H], the whole layer's batch (the shard computes the pairs whose owner is itself; `lora` 1: the rows carry
# their adapter slots, -1 = base; 0: no adapters bound, slots unused); shard -> router: its weighted sum [n, H].
# A shard always has its next receive posted, sized for the last n it was told (0 at start: a bare header); the
# router first sends a RESIZE message of the old size when n changes. So an exchange is one message each way.
OP_STOP, OP_COMPUTE, OP_RESIZE = 0, 1, 2
HEADER_BYTES = 5 * 8


def message_bytes(n: int, h: int, k: int, dtype: torch.dtype) -> int:
    return HEADER_BYTES + n * h * torch.empty((), dtype=dtype).element_size() + n * k * (8 + 8 + 4) + n * 8


def pack(op: int, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
         owner: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
    """header + ids [n, k] long + owner [n, k] long + w [n, k] fp32 + slots [n] long + x [n, H] (each aligned for
    its type) -> one host uint8 buffer."""
    n, k = ids.shape
    lora = slots if slots is not None else ids.new_full((n,), -1)
    body = torch.cat([t.contiguous().view(torch.uint8).flatten() for t in (ids, owner, w.float(), lora.long(), x)])
    header = torch.tensor([op, layer, n, k, int(slots is not None)], dtype=torch.long).view(torch.uint8)
    return torch.cat([header, body.cpu()])


def control(op: int, n: int, k: int, size: int) -> torch.Tensor:
    """A message of `size` bytes that carries only a header (RESIZE to n rows, or STOP)."""
    buf = torch.zeros(size, dtype=torch.uint8)
    buf[:HEADER_BYTES].view(torch.long).copy_(torch.tensor([op, 0, n, k, 0], dtype=torch.long))
    return buf


def read_header(buf: torch.Tensor) -> list[int]:
    """[op, layer, n, k, lora] of a message."""
    return buf[:HEADER_BYTES].view(torch.long).tolist()


def unpack(buf: torch.Tensor, n: int, h: int, k: int, dtype: torch.dtype, lora: int = 0):
    """The inverse of `pack` -> x [n, H], ids, w, owner [n, k], slots [n] or None (views into buf)."""
    sizes = (n * k * 8, n * k * 8, n * k * 4, n * 8, n * h * torch.empty((), dtype=dtype).element_size())
    ids, owner, w, slots, x = buf[HEADER_BYTES:HEADER_BYTES + sum(sizes)].split(sizes)
    return x.view(dtype).view(n, h), ids.view(torch.long).view(n, k), w.view(torch.float32).view(n, k), \
        owner.view(torch.long).view(n, k), (slots.view(torch.long) if lora else None)


class ExpertShard:
    def __init__(self, path: str, experts: dict[int, list[int]], dtype: str = "float32",
                 device: str = "cpu", threads: int | None = None, quantization: str = "none", max_loras: int = 0,
                 max_rank: int = 0) -> None:
        # quantization: EngineConfig.quantization, applied on this shard's device (FP8 experts stay FP8 on CUDA
        # under "auto", as the router's own weights do)
        # max_loras, max_rank: the router's adapter slots (stacks allocated at the first write; 0: no adapters)
        from raymoe.platform.checkpoint.experts import load_experts
        from raymoe.platform.config import ModelConfig
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        held = {layer: ids for layer, ids in experts.items() if ids}
        self.experts, self._keys = load_experts(path, held, self.dtype, self.device, quantization=quantization)
        self.hidden = ModelConfig.from_pretrained(path).hidden_size
        self.lora = ShardLora(self.experts, max_loras, max_rank, self.dtype)
        self._collective = threading.Lock()       # one data-plane loop at a time

    def ping(self) -> bool:
        return True

    def keys_read(self) -> list[str]:
        """The checkpoint tensors this shard read when it loaded."""
        return sorted(self._keys)

    def held_lora(self) -> dict[int, int]:
        """The adapter slots this shard holds: slot -> version (empty after a restart)."""
        return self.lora.held()

    def write_lora(self, slot: int, version: int, factors: dict) -> None:
        """Put an adapter's routed-expert factors for this shard's experts into `slot` (see shard_lora)."""
        self.lora.write(slot, version, factors)

    @torch.inference_mode()
    def compute(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        # x: [n, H]; topk_ids, topk_w: [n, k] (id -1: an expert some other shard computes); slots: [n] adapter slot
        # of each row (-1: base; None: no adapters bound) -> [n, H] on x's device
        dev = x.device
        lora = self.lora.factors(layer, None if slots is None else slots.to(self.device))
        y = self.experts[layer](x.to(self.device, self.dtype), topk_ids.to(self.device), topk_w.to(self.device),
                                lora=lora)
        return y.to(dev)

    def serve_collective(self, init_method: str, rank: int, world: int, timeout_s: float) -> int:
        """Join the replica's gloo group as `rank` (shard rank - 1 of the plan) and compute exchanges until the
        router says stop or the group breaks. Returns how many exchanges it served."""
        import torch.distributed as dist
        me = rank - 1
        with self._collective:
            dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
            served = 0
            try:
                buf = torch.empty(HEADER_BYTES, dtype=torch.uint8)         # n = 0 rows: a bare header
                while True:
                    dist.recv(buf, src=0)
                    op, layer, n, k, lora = read_header(buf)
                    if op == OP_STOP:
                        break
                    if op == OP_RESIZE:
                        buf = torch.empty(message_bytes(n, self.hidden, k, self.dtype), dtype=torch.uint8)
                        continue
                    x, ids, w, owner, slots = unpack(buf, n, self.hidden, k, self.dtype, lora)
                    y = self.compute(layer, x, torch.where(owner == me, ids, -1), w, slots)
                    dist.send(y.contiguous(), dst=0)
                    served += 1
            except RuntimeError as e:                     # the router went away or re-forms the group
                log.info("collective loop of rank %d ended: %s", rank, str(e).splitlines()[0])
            finally:
                dist.destroy_process_group()
            return served
