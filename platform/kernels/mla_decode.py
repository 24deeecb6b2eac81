"""Paged MLA decode attention in Triton: absorbed-form attention of 1-3 query tokens per sequence over the paged
latent cache, split over the context (flash-decoding) with a reduction pass.

The cache row of a token is its latent: `R` values of c_kv (the keys' and the values' shared part) and `P` values of
the rotated k_pe. A query row is `R + P` wide too (q_nope absorbed into latent space | rotated q_pe). For sequence b
with `Q` new tokens and context length L (after this step, its new tokens included), query token t sits at position
L - Q + t and sees keys 0..L - Q + t. Its output is softmax(q . k * scale) over those keys applied to c_kv: `R` values.

Pass 1 (`_split_kernel`): a program owns BLOCK_M query rows (heads x query tokens of one sequence, all of which share
the sequence's keys, as MLA's heads do) and one split of the context; it walks that split BLOCK_N keys at a time
(gathering them through the block table), keeps a running max and sum in fp32 (online softmax), accumulates the
weighted latents in fp32, and writes the normalised partial output and its log-sum-exp. Pass 2 (`_combine_kernel`)
merges the splits of each row. The grid depends on the batch size, the table width and the head count only, never on
the lengths: a CUDA graph captures it once per (batch, context bucket).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tile(q_lat, q_pe, Cache, Tables, b, n0, end, qpos, m_i, l_i, acc, stride_table, block_size, sm_scale_log2,
          R: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, offs_r, offs_p, r_ok, p_ok,
          INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    # one tile of BLOCK_N keys starting at n0: online-softmax update of (m_i, l_i, acc)
    D: tl.constexpr = R + P
    keys = n0 + tl.arange(0, BLOCK_N)
    key_ok = keys < end
    blk = tl.load(Tables + b * stride_table + keys // block_size, mask=key_ok, other=0)
    slot = (blk * block_size + keys % block_size).to(tl.int64) * D    # [BLOCK_N] row offsets into the cache
    kv = tl.load(Cache + slot[:, None] + offs_r[None, :], mask=key_ok[:, None] & r_ok[None, :], other=0.0)
    pe = tl.load(Cache + slot[:, None] + R + offs_p[None, :], mask=key_ok[:, None] & p_ok[None, :], other=0.0)
    if INTERPRET:       # the interpreter's 16-bit dot is wrong (Triton 3.6): the same products in fp32
        q_lat, q_pe, kv, pe = q_lat.to(tl.float32), q_pe.to(tl.float32), kv.to(tl.float32), pe.to(tl.float32)
    s = (tl.dot(q_lat, tl.trans(kv), input_precision=PRECISION)
         + tl.dot(q_pe, tl.trans(pe), input_precision=PRECISION))      # [BLOCK_M, BLOCK_N] fp32
    s = s * sm_scale_log2
    visible = key_ok[None, :] & (keys[None, :] <= qpos[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)           # a row with no visible key yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(Cache.dtype.element_ty).to(kv.dtype), kv, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _split_kernel(Q, Cache, Tables, Lens, Part, Lse,
                  stride_table, M, H, QLEN, block_size, split_len, sm_scale_log2,
                  R: tl.constexpr, P: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                  INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    # Q: [B * M, R + P] (M = QLEN * H rows per sequence); Cache: [slots, R + P]; Tables: [B, W]; Lens: [B]
    # -> Part: [B * M, NUM_SPLITS, R] fp32 (normalised partial outputs), Lse: [B * M, NUM_SPLITS] fp32 (log2 units)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    D: tl.constexpr = R + P
    seq_len = tl.load(Lens + b).to(tl.int32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    qpos = seq_len - QLEN + rows // H                                   # [BLOCK_M] position of each query row
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    r_ok = offs_r < R
    p_ok = offs_p < P
    q_rows = (b * M + rows).to(tl.int64) * D
    q_lat = tl.load(Q + q_rows[:, None] + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    q_pe = tl.load(Q + q_rows[:, None] + R + offs_p[None, :], mask=row_ok[:, None] & p_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, seq_len)
    if INTERPRET:       # Triton's interpreter (CPU development runs) cannot run a for loop over program-id bounds
        n0 = start
        while n0 < end:
            m_i, l_i, acc = _tile(q_lat, q_pe, Cache, Tables, b, n0, end, qpos, m_i, l_i, acc, stride_table,
                                  block_size, sm_scale_log2, R, P, BLOCK_N, offs_r, offs_p, r_ok, p_ok, INTERPRET,
                                  PRECISION)
            n0 += BLOCK_N
    else:               # a for loop: Triton pipelines its loads (num_stages)
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _tile(q_lat, q_pe, Cache, Tables, b, n0, end, qpos, m_i, l_i, acc, stride_table,
                                  block_size, sm_scale_log2, R, P, BLOCK_N, offs_r, offs_p, r_ok, p_ok, INTERPRET,
                                  PRECISION)

    has = l_i > 0
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    prow = (b * M + rows).to(tl.int64) * NUM_SPLITS + pid_s
    tl.store(Part + prow[:, None] * R + offs_r[None, :], out, mask=row_ok[:, None] & r_ok[None, :])
    tl.store(Lse + prow, lse, mask=row_ok)


@triton.jit
def _combine_kernel(Part, Lse, Out, R: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    # Part: [rows, NUM_SPLITS, R] fp32; Lse: [rows, NUM_SPLITS] -> Out: [rows, R] in Out's dtype
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_R)
    s_ok = offs_s < NUM_SPLITS
    r_ok = offs_r < R
    lse = tl.load(Lse + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.exp2(lse - mx)                                               # empty splits weigh 0
    w = w / tl.sum(w, 0)
    part = tl.load(Part + (row * NUM_SPLITS + offs_s)[:, None] * R + offs_r[None, :],
                   mask=s_ok[:, None] & r_ok[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0)
    tl.store(Out + row * R + offs_r, out.to(Out.dtype.element_ty), mask=r_ok)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def default_config(rows: int, R: int) -> dict:
    """Tile sizes for `rows` query rows per sequence (heads x query tokens) and latent width R."""
    block_m = 64 if rows >= 64 else _pow2(rows)
    wide = _pow2(R) >= 256
    # measured on an H200 (128 heads, R = 512, 32K context): 64 x 64 tiles with 8 warps beat 64 x 32 by 1.3-1.4x
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=8 if wide and block_m >= 64 else 4, num_stages=2)


def num_splits(batch: int, row_blocks: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Splits of the context so that the grid fills the device about twice, each split at least 4 tiles long.
    Depends on shapes only (never on the lengths), so a captured graph keeps it."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 132
    want = -(-2 * sms // max(1, batch * row_blocks))
    most = max(1, capacity // (4 * block_n))
    return max(1, min(want, most, 64))


def paged_mla_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     query_len: int, scale: float, value_dim: int, out: torch.Tensor | None = None,
                     config: dict | None = None, splits: int | None = None) -> torch.Tensor:
    """Absorbed MLA attention of `query_len` new tokens per sequence over the paged latent cache.

    q: [B * query_len, H, D] (rows of sequence b first, token-major); cache: [num_blocks, block_size, D] holding
    this step's latents already; block_tables: [B, W]; seq_lens: [B] context lengths after this step.
    Returns [B * query_len, H, value_dim] in q's dtype (written into `out` when given).
    """
    N, H, D = q.shape
    B, W = block_tables.shape
    if N != B * query_len:
        raise ValueError(f"q has {N} rows, expected {B} sequences x {query_len} query tokens")
    if cache.shape[-1] != D or cache.dtype != q.dtype:
        raise ValueError(f"cache [.., {cache.shape[-1]}] {cache.dtype} does not match q [.., {D}] {q.dtype}")
    R, P = value_dim, D - value_dim
    block_size = cache.shape[1]
    M = query_len * H
    cfg = {**default_config(M, R), **(config or {})}
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    row_blocks = -(-M // block_m)
    capacity = W * block_size
    S = splits or num_splits(B, row_blocks, capacity, block_n, q.device)
    split_len = -(-(-(-capacity // S)) // block_n) * block_n
    S = -(-capacity // split_len)
    q = q.contiguous()
    part = torch.empty(B * M, S, R, dtype=torch.float32, device=q.device)
    lse = torch.empty(B * M, S, dtype=torch.float32, device=q.device)
    _split_kernel[(row_blocks, S, B)](
        q, cache, block_tables, seq_lens, part, lse,
        block_tables.stride(0), M, H, query_len, block_size, split_len, scale * LOG2E,
        R=R, P=P, NUM_SPLITS=S, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_pow2(R), BLOCK_P=_pow2(P),
        INTERPRET=os.environ.get("TRITON_INTERPRET") == "1",
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",      # fp32 caches: full-precision products
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if out is None:
        out = torch.empty(N, H, R, dtype=q.dtype, device=q.device)
    _combine_kernel[(B * M,)](part, lse, out, R=R, NUM_SPLITS=S, BLOCK_S=_pow2(S, 1), BLOCK_R=_pow2(R),
                              num_warps=4 if R >= 256 else 1)
    return out


def flops_and_bytes(batch: int, context: int, heads: int, query_len: int, R: int, P: int) -> tuple[float, float]:
    """The work of one call: floating-point operations (QK over R + P and PV over R, per head and query token) and
    the fewest bytes (each cached latent read once in bf16)."""
    flops = 2.0 * batch * context * heads * query_len * (2 * R + P)
    return flops, 2.0 * batch * context * (R + P)


__all__ = ["default_config", "flops_and_bytes", "num_splits", "paged_mla_decode"]
