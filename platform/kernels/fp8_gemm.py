"""Weight-only FP8 GEMMs for decode in Triton: the release's e4m3 weights with 128 x 128 block scales stay in FP8 in
memory and are widened in registers against bf16 activations, so a decode step reads half the weight bytes.

A weight W8 [N, K] (float8_e4m3fn) with `scale_inv` S [ceil(N/128), ceil(K/128)] means W = W8 * S per 128 x 128
block (platform/checkpoint/fp8.py). y = x @ W^T is computed one 128-wide K block at a time: the block's product
x_k @ W8_k^T in fp32 (e4m3 widens to bf16 exactly), times the block's scale for each output column, summed in
fp32. `fp8_linear` splits K over programs when N alone gives too few (a decode GEMM has M = 1..64 rows) and sums
the parts; `fp8_grouped` runs the routed experts of a layer in one launch over rows sorted by expert, as
`torch._grouped_mm` takes them (`offs`: cumulative row ends per expert).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

BLOCK = 128          # the checkpoint's quantisation block (both dimensions)


@triton.jit
def _block_product(x, w8, INTERPRET: tl.constexpr):
    # x: [BLOCK_M, BLOCK_K] bf16; w8: [BLOCK_N, BLOCK_K] e4m3 -> [BLOCK_M, BLOCK_N] fp32
    if INTERPRET:       # the interpreter's 16-bit dot is wrong (Triton 3.6): the same product in fp32
        return tl.dot(x.to(tl.float32), tl.trans(w8.to(tl.float32)))
    return tl.dot(x, tl.trans(w8.to(x.dtype)))


@triton.jit
def _linear_kernel(X, W, S, Y, M, N, K, stride_x, stride_w, stride_s, K_ITERS: tl.constexpr,
                   SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   INTERPRET: tl.constexpr):
    # X: [M, K] bf16; W: [N, K] e4m3; S: [ceil(N/128), ceil(K/128)] fp32 -> Y: [SPLIT_K, M, N] fp32 partial sums
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(0, K_ITERS):                                          # (static bounds: see _grouped_kernel)
        kb = pid_k + i * SPLIT_K                                        # this program's K blocks: pid_k, +SPLIT_K, ..
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_x + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w8 = tl.load(W + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :],
                     mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        s = tl.load(S + (offs_n // 128) * stride_s + kb, mask=n_ok & (offs_n * 0 + kb * BLOCK_K < K),
                    other=0.0)   # (a vector mask: the interpreter takes no scalar one)
        acc += _block_product(x, w8, INTERPRET) * s[None, :]
    y = Y + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(y, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grouped_kernel(X, W, S, Offs, Y, N, K: tl.constexpr, stride_x, stride_we, stride_wn, stride_se, stride_sn,
                    stride_y,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    # X: [T, K] bf16 rows sorted by expert; W: [E, N, K] e4m3; S: [E, ceil(N/128), ceil(K/128)]; Offs: [E] int32
    # cumulative row ends -> Y: [T, N] in Y's dtype. Program (n tile, expert e) computes e's rows (none: returns).
    pid_n = tl.program_id(0)
    e = tl.program_id(1)
    end = tl.load(Offs + e)
    start = tl.load(Offs + e - 1, mask=e > 0, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_base = W + e.to(tl.int64) * stride_we
    s_base = S + e.to(tl.int64) * stride_se
    m0 = start
    while m0 < end:                                                     # decode: one tile of rows, or none
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):         # K static: Triton's interpreter runs no loop over run-time bounds
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_x + offs_k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w8 = tl.load(w_base + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            s = tl.load(s_base + (offs_n // 128) * stride_sn + k0 // BLOCK_K, mask=n_ok, other=0.0)
            acc += _block_product(x, w8, INTERPRET) * s[None, :]
        tl.store(Y + offs_m[:, None].to(tl.int64) * stride_y + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
        m0 += BLOCK_M


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(w8: torch.Tensor, scale_inv: torch.Tensor, K: int) -> None:
    N = w8.shape[-2]
    if w8.dtype != torch.float8_e4m3fn or w8.shape[-1] != K:
        raise ValueError(f"expected a float8_e4m3fn weight [.., N, {K}], got {w8.dtype} {tuple(w8.shape)}")
    if tuple(scale_inv.shape[-2:]) != (-(-N // BLOCK), -(-K // BLOCK)):
        raise ValueError(f"scale_inv {tuple(scale_inv.shape)} does not match 128 x 128 blocks of {tuple(w8.shape)}")


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale_inv: torch.Tensor, block_n: int = 64,
               split_k: int | None = None) -> torch.Tensor:
    """y = x @ W^T with W = w8 * scale_inv per 128 x 128 block. x: [M, K] bf16/fp16 -> [M, N] in x's dtype."""
    M, K = x.shape
    N = w8.shape[0]
    _check(w8, scale_inv, K)
    x = x.contiguous()
    block_m = max(16, min(64, triton.next_power_of_2(M)))
    n_tiles, m_tiles, k_blocks = -(-N // block_n), -(-M // block_m), -(-K // BLOCK)
    if split_k is None:
        sms = _num_sms(x.device.index or 0) if x.is_cuda else 132
        split_k = max(1, min(k_blocks, -(-2 * sms // (n_tiles * m_tiles))))
    part = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
    _linear_kernel[(n_tiles, split_k, m_tiles)](
        x, w8, scale_inv, part, M, N, K, x.stride(0), w8.stride(0), scale_inv.stride(0), -(-k_blocks // split_k),
        SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK, INTERPRET=_interpret(),
        num_warps=4, num_stages=4)
    return (part[0] if split_k == 1 else part.sum(0)).to(x.dtype)


def fp8_grouped(x: torch.Tensor, w8: torch.Tensor, scale_inv: torch.Tensor, offs: torch.Tensor,
                block_n: int = 64) -> torch.Tensor:
    """Per-expert y_e = x_e @ W_e^T over rows sorted by expert (rows offs[e-1]:offs[e] belong to expert e).
    x: [T, K]; w8: [E, N, K] e4m3; scale_inv: [E, ceil(N/128), ceil(K/128)]; offs: [E] int32 -> [T, N]."""
    T, K = x.shape
    E, N, _ = w8.shape
    _check(w8, scale_inv, K)
    if offs.shape != (E,):
        raise ValueError(f"offs has shape {tuple(offs.shape)}, expected ({E},)")
    x = x.contiguous()
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    _grouped_kernel[(-(-N // block_n), E)](
        x, w8, scale_inv, offs, y, N, K, x.stride(0), w8.stride(0), w8.stride(1), scale_inv.stride(0),
        scale_inv.stride(1), y.stride(0), BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=BLOCK, INTERPRET=_interpret(),
        num_warps=4, num_stages=3)
    return y


__all__ = ["fp8_grouped", "fp8_linear"]
