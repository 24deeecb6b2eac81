"""Weight-only FP8 GEMMs for decode in Triton: the release's e4m3 weights with 128 x 128 block scales stay in FP8 in
memory and are widened in registers against bf16 activations, so a decode step reads half the weight bytes.

A weight W8 [N, K] (float8_e4m3fn) with `scale_inv` S [ceil(N/128), ceil(K/128)] means W = W8 * S per 128 x 128
block (platform/checkpoint/fp8.py). y = x @ W^T is computed one 128-wide K block at a time: the block's product
x_k @ W8_k^T in fp32 (e4m3 widens to bf16 exactly), times the block's scale for each output column, summed in
fp32. A decode GEMM has M = 1..64 rows, so the N tiles alone give too few programs to keep the memory system busy:
both kernels split K over programs (`Tiles.split_k`), write fp32 partial sums, and one more launch adds the parts
in a fixed order (deterministic, CUDA-graph safe) and casts. `fp8_grouped` runs the routed experts of a layer in
one launch over rows sorted by expert, as `torch._grouped_mm` takes them (`offs`: cumulative row ends per expert);
its programs walk the experts that have rows (the j-th program row takes the j-th non-empty expert, found on the
device from `offs`), so a decode step with 8 of 256 experts used launches 8 expert rows of programs, not 256.

`Tiles` are the launch parameters. `linear_tiles` / `grouped_tiles` take them from `fp8_tiles.json` where it has
the GPU (by its CUDA device name) and the shape: measured by `benchmarks/gpu_decode.py --sections fp8tune`, which
times a grid of tiles at DeepSeek-V3's shapes and writes the fastest (as vLLM keeps tuned MoE configs per device);
else from a rule of thumb (about two programs per SM). RAYMOE_FP8_TILES=off ignores the file. A caller may pass its
own (the sweep does).
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

BLOCK = 128          # the checkpoint's quantisation block (both dimensions)
TILES_FILE = Path(__file__).with_name("fp8_tiles.json")
BUSY_BUCKETS = (8, 64, 256)   # grouped GEMMs are tuned at these numbers of busy experts (batch 1, 8, 32 at top-8)


class Tiles(NamedTuple):
    """Launch parameters of one FP8 GEMM: output columns per program, K splits (partial sums), warps, stages."""
    block_n: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _block_product(x, w8, INTERPRET: tl.constexpr):
    # x: [BLOCK_M, BLOCK_K] bf16; w8: [BLOCK_N, BLOCK_K] e4m3 -> [BLOCK_M, BLOCK_N] fp32
    if INTERPRET:       # the interpreter's 16-bit dot is wrong (Triton 3.6): the same product in fp32
        return tl.dot(x.to(tl.float32), tl.trans(w8.to(tl.float32)))
    return tl.dot(x, tl.trans(w8.to(x.dtype)))


@triton.jit
def _linear_kernel(X, W, S, P, M, N, K, stride_x, stride_w, stride_s, k_iters, split_k,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    # X: [M, K] bf16; W: [N, K] e4m3; S: [ceil(N/128), ceil(K/128)] fp32 -> P: [split_k, M, N] fp32 partial sums
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(0, k_iters):
        kb = pid_k + i * split_k                                        # this program's K blocks: pid_k, +split_k..
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_x + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w8 = tl.load(W + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :],
                     mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        s = tl.load(S + (offs_n // 128) * stride_s + kb, mask=n_ok & (offs_n * 0 + kb * BLOCK_K < K),
                    other=0.0)   # (a vector mask: the interpreter takes no scalar one)
        acc += _block_product(x, w8, INTERPRET) * s[None, :]
    p = P + pid_k.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(p, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grouped_kernel(X, W, S, Offs, P, T, N, K, E, stride_x, stride_we, stride_wn, stride_se, stride_sn,
                    k_iters, split_k,
                    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    INTERPRET: tl.constexpr):
    # X: [T, K] bf16 rows sorted by expert; W: [E, N, K] e4m3; S: [E, ceil(N/128), ceil(K/128)]; Offs: [E] int32
    # cumulative row ends -> P: [split_k, T, N] fp32 partial sums. Program (n tile, j, k split) computes the rows of
    # the j-th expert that has rows (none: nothing), over its share of the K blocks.
    pid_n = tl.program_id(0)
    j = tl.program_id(1)
    pid_k = tl.program_id(2)
    ar = tl.arange(0, E_POW2)
    ends = tl.load(Offs + ar, mask=ar < E, other=0)
    starts = tl.load(Offs + ar - 1, mask=(ar > 0) & (ar < E), other=0)
    busy = ends > starts
    rank = tl.cumsum(busy.to(tl.int32), 0)                              # 1-based rank of each busy expert
    mine = busy & (rank == j + 1)
    e = tl.sum(tl.where(mine, ar, 0), 0)
    start = tl.sum(tl.where(mine, starts, 0), 0)
    end = tl.sum(tl.where(mine, ends, 0), 0)                           # no j-th busy expert: start = end = 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_base = W + e.to(tl.int64) * stride_we
    s_base = S + e.to(tl.int64) * stride_se
    m0 = start
    while m0 < end:                                                     # decode: one tile of rows, or none
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for i in range(0, k_iters):
            kb = pid_k + i * split_k
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_x + offs_k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w8 = tl.load(w_base + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            s = tl.load(s_base + (offs_n // 128) * stride_sn + kb, mask=n_ok & (offs_n * 0 + kb * BLOCK_K < K),
                        other=0.0)
            acc += _block_product(x, w8, INTERPRET) * s[None, :]
        p = P + pid_k.to(tl.int64) * T * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(p, acc, mask=m_ok[:, None] & n_ok[None, :])
        m0 += BLOCK_M


@triton.jit
def _sum_parts_kernel(P, Y, size, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    # P: [SPLIT_K, size] fp32 -> Y: [size] in Y's dtype, the parts added in order
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, SPLIT_K):
        acc += tl.load(P + i * size + offs, mask=ok, other=0.0)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=ok)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(x: torch.Tensor) -> int:
    return _num_sms(x.device.index or 0) if x.is_cuda else 132


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(w8: torch.Tensor, scale_inv: torch.Tensor, K: int) -> None:
    N = w8.shape[-2]
    if w8.dtype != torch.float8_e4m3fn or w8.shape[-1] != K:
        raise ValueError(f"expected a float8_e4m3fn weight [.., N, {K}], got {w8.dtype} {tuple(w8.shape)}")
    if tuple(scale_inv.shape[-2:]) != (-(-N // BLOCK), -(-K // BLOCK)):
        raise ValueError(f"scale_inv {tuple(scale_inv.shape)} does not match 128 x 128 blocks of {tuple(w8.shape)}")


def _block_m(rows: int) -> int:
    return max(16, min(64, triton.next_power_of_2(max(rows, 1))))


def _split_for(programs: int, k_blocks: int, sms: int, waves: int) -> int:
    """K splits that bring `programs` (the grid without splits) up to about `waves` programs per SM."""
    return max(1, min(k_blocks, -(-waves * sms // max(programs, 1))))


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def tuned_tiles(device: str) -> dict[str, dict[str, Tiles]]:
    """fp8_tiles.json's entries for a GPU: {"linear": {"block_m,N,K": Tiles}, "grouped": {"busy,N,K": Tiles}}."""
    if os.environ.get("RAYMOE_FP8_TILES") == "off" or not TILES_FILE.exists():
        return {}
    entry = json.loads(TILES_FILE.read_text()).get(device, {})
    return {kind: {k: Tiles(*v) for k, v in table.items()} for kind, table in entry.items()}


def _table(x: torch.Tensor | None, kind: str) -> dict[str, Tiles]:
    if x is None or not x.is_cuda:
        return {}
    return tuned_tiles(_device_name(x.device.index or 0)).get(kind, {})


def busy_bucket(busy: int) -> int:
    """The tuned number of busy experts nearest to `busy` (log scale)."""
    return min(BUSY_BUCKETS, key=lambda b: abs(math.log2(b) - math.log2(max(busy, 1))))


def linear_tiles(M: int, N: int, K: int, sms: int, x: torch.Tensor | None = None) -> Tiles:
    """Launch parameters for an [M, K] x [N, K]^T product (see the module docstring)."""
    block_m = _block_m(M)
    hit = _table(x, "linear").get(f"{block_m},{N},{K}")
    if hit is not None:
        return hit
    block_n = 64
    programs = -(-N // block_n) * -(-M // block_m)
    return Tiles(block_n, _split_for(programs, -(-K // BLOCK), sms, 2), 4, 4)


def grouped_tiles(T: int, E: int, N: int, K: int, sms: int, x: torch.Tensor | None = None) -> Tiles:
    """Launch parameters for one layer's experts over T sorted rows (at most min(T, E) experts have rows)."""
    busy = min(T, E)
    hit = _table(x, "grouped").get(f"{busy_bucket(busy)},{N},{K}")
    if hit is not None:
        return hit
    block_n = 64
    return Tiles(block_n, _split_for(-(-N // block_n) * busy, -(-K // BLOCK), sms, 2), 4, 3)


def _finish(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # part: [split, M, N] fp32 -> [M, N] dtype
    split, M, N = part.shape
    y = torch.empty(M, N, dtype=dtype, device=part.device)
    if y.numel():
        blk = 1024
        _sum_parts_kernel[(-(-y.numel() // blk),)](part, y, y.numel(), SPLIT_K=split, BLOCK=blk)
    return y


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale_inv: torch.Tensor, tiles: Tiles | None = None,
               split_k: int | None = None) -> torch.Tensor:
    """y = x @ W^T with W = w8 * scale_inv per 128 x 128 block. x: [M, K] bf16/fp16 -> [M, N] in x's dtype.
    `tiles`: launch parameters (default `linear_tiles`); `split_k` overrides theirs."""
    M, K = x.shape
    N = w8.shape[0]
    _check(w8, scale_inv, K)
    x = x.contiguous()
    t = tiles or linear_tiles(M, N, K, _sms(x), x)
    k_blocks = -(-K // BLOCK)
    split = max(1, min(k_blocks, split_k or t.split_k))
    block_m = _block_m(M)
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    _linear_kernel[(-(-N // t.block_n), split, -(-M // block_m))](
        x, w8, scale_inv, part, M, N, K, x.stride(0), w8.stride(0), scale_inv.stride(0), -(-k_blocks // split),
        split, BLOCK_M=block_m, BLOCK_N=t.block_n, BLOCK_K=BLOCK, INTERPRET=_interpret(),
        num_warps=t.num_warps, num_stages=t.num_stages)
    return _finish(part, x.dtype)


def fp8_grouped(x: torch.Tensor, w8: torch.Tensor, scale_inv: torch.Tensor, offs: torch.Tensor,
                tiles: Tiles | None = None) -> torch.Tensor:
    """Per-expert y_e = x_e @ W_e^T over rows sorted by expert (rows offs[e-1]:offs[e] belong to expert e; rows past
    offs[-1] come out undefined). x: [T, K]; w8: [E, N, K] e4m3; scale_inv: [E, ceil(N/128), ceil(K/128)];
    offs: [E] int32 -> [T, N]. `tiles`: launch parameters (default `grouped_tiles`)."""
    T, K = x.shape
    E, N, _ = w8.shape
    _check(w8, scale_inv, K)
    if offs.shape != (E,):
        raise ValueError(f"offs has shape {tuple(offs.shape)}, expected ({E},)")
    if T == 0:
        return torch.empty(0, N, dtype=x.dtype, device=x.device)
    x = x.contiguous()
    t = tiles or grouped_tiles(T, E, N, K, _sms(x), x)
    k_blocks = -(-K // BLOCK)
    split = max(1, min(k_blocks, t.split_k))
    part = torch.empty(split, T, N, dtype=torch.float32, device=x.device)
    _grouped_kernel[(-(-N // t.block_n), min(T, E), split)](
        x, w8, scale_inv, offs, part, T, N, K, E, x.stride(0), w8.stride(0), w8.stride(1), scale_inv.stride(0),
        scale_inv.stride(1), -(-k_blocks // split), split, E_POW2=triton.next_power_of_2(E), BLOCK_M=16,
        BLOCK_N=t.block_n, BLOCK_K=BLOCK, INTERPRET=_interpret(), num_warps=t.num_warps, num_stages=t.num_stages)
    return _finish(part, x.dtype)


__all__ = ["BUSY_BUCKETS", "TILES_FILE", "Tiles", "busy_bucket", "fp8_grouped", "fp8_linear", "grouped_tiles",
           "linear_tiles", "tuned_tiles"]
