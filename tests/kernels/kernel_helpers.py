"""Helpers of the kernel tests: where the Triton kernels can run (a CUDA GPU, or Triton's interpreter on the CPU when
TRITON_INTERPRET=1 is set for a development run), and random paged caches as an allocator leaves them."""
from __future__ import annotations

import os

import pytest
import torch


def kernel_device() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception:                                   # noqa: BLE001
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


DEV = kernel_device()
needs_kernels = pytest.mark.skipif(DEV is None, reason="Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 with "
                                                       "Triton installed, for a development run on the CPU)")
needs_cuda = pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU with Triton")


def random_paged(seq_lens: list[int], block_size: int, dim: int, gen: torch.Generator, dtype=torch.bfloat16,
                 extra_cols: int = 1, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache [num_blocks, block_size, dim] and shuffled block tables [B, W]: each sequence owns distinct
    random blocks; columns past a sequence's blocks (and `extra_cols` more) point at random blocks too, which the
    attention must never read."""
    need = [-(-L // block_size) for L in seq_lens]
    width = max(need) + extra_cols
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(seq_lens), width), generator=gen)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used:used + n]
        used += n
    cache = torch.randn(num_blocks, block_size, dim, generator=gen).to(dtype)
    return cache.to(device), tables.to(device)
