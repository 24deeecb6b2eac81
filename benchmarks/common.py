"""What the benchmarks share: DeepSeek-V3's full-width dimensions (`V3_DIMS`), its YaRN rope dict (`YARN`) and the
timing helpers (`sync`, `elapsed`, `timed`, `matmul_tflops`). Never model code: each benchmark builds its own model
from these numbers.

A sibling module: the benchmarks put this folder on sys.path and `from common import ...`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

# The release's config.json as far as the benchmarks use it; each benchmark sets what it changes (layer counts,
# vocabulary, experts) on top: {**V3_DIMS, "num_hidden_layers": 2, ...}.
V3_DIMS: dict[str, Any] = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
    n_shared_experts=1, routed_scaling_factor=2.5, max_position_embeddings=163840)
# The release's rope_scaling (YaRN, 4K -> 160K positions).
YARN: dict[str, Any] = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                            mscale=1.0, mscale_all_dim=1.0)


def sync(device: str | torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def elapsed(fn: Callable[[], object], device: str | torch.device) -> float:
    """Seconds one call of `fn` takes, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed(fn: Callable[[], object], device: str | torch.device, iters: int) -> float:
    """Median seconds of one call over `iters` calls (the upper middle one for even `iters`), after one warm-up;
    each call synchronised: a step of tens of milliseconds hides no slow outlier in a mean, and the sync costs
    nothing measurable."""
    fn()
    times = sorted(elapsed(fn, device) for _ in range(iters))
    return times[len(times) // 2]


def matmul_tflops(device: str | torch.device = "cuda", n: int = 8192, iters: int = 20,
                  blocks: int = 0) -> tuple[float, float]:
    """bf16 n x n x n matmul rates on random data, TFLOP/s: (burst, sustained). Burst: `iters` back-to-back products
    right after 3 warm-ups; sustained: the median of `blocks` more such blocks (`timed`; nan when `blocks` is 0). An
    H200 that has been idle runs the first ~30 ms at its burst rate, then settles about 15% lower (power-limited on
    random data), which is where a training step runs."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)

    def block(count: int) -> None:
        for _ in range(count):
            a @ b
    block(3)
    flop = 2 * n ** 3 * iters
    burst = flop / elapsed(lambda: block(iters), device) / 1e12
    sustained = flop / timed(lambda: block(iters), device, blocks) / 1e12 if blocks else float("nan")
    return burst, sustained
