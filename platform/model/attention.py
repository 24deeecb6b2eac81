"""Attention over MLA latents: the batch description a cached forward carries, and the absorbed-space kernels.

Owns `PagedAttention` (where each new token's latent goes in the paged cache and which cached tokens each
sequence reads) and the pure-PyTorch attention over latents: a batched path for decode (one query per sequence)
and a per-sequence path for prefill chunks, split into query blocks so a 128K context never materialises a
[queries, heads, 128K] score tensor at once. It knows nothing of weights; `mla.py` projects into latent space.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raymoe.platform import kernels

# Upper bound on score elements (queries x heads x keys) materialised at once by the prefill path.
SCORE_BUDGET = 1 << 25
# Longest per-sequence query (decode: 1, MTP verification: k + 1) the paged decode kernel serves; longer chunks are
# prefill, which the per-sequence PyTorch path runs.
KERNEL_MAX_QUERY_LEN = 8


@dataclass
class PagedAttention:
    """One batch's view of the paged latent cache.

    Tokens of the batch are flat: sequence b owns rows query_start[b]:query_start[b+1]. After this step
    sequence b holds seq_lens[b] tokens in the cache (its new tokens are the last query_lens[b] of them).
    """

    slot_mapping: torch.Tensor          # [N] long: flat cache slot (block * block_size + offset) per new token
    block_tables: torch.Tensor          # [B, max_blocks] long
    query_start: list[int]              # B + 1 host ints
    seq_lens: list[int]                 # B host ints
    block_size: int
    seq_lens_t: torch.Tensor = field(default=None)  # [B] long on device (decode path)
    query_len: int | None = None        # set when every sequence computes this many tokens (see `uniform`)
    _decode: tuple | None = field(default=None, repr=False)
    _prefill: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.seq_lens_t is None:
            self.seq_lens_t = torch.tensor(self.seq_lens, dtype=torch.long, device=self.block_tables.device)

    @classmethod
    def uniform(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens_t: torch.Tensor,
                query_len: int, block_size: int) -> PagedAttention:
        """A batch where each of the B sequences computes `query_len` new tokens (decode: 1; MTP verification:
        k + 1), described by device tensors only: no host list depends on B or on the lengths, so a compiled
        or captured step can keep B and the context width symbolic."""
        return cls(slot_mapping=slot_mapping, block_tables=block_tables, query_start=[], seq_lens=[],
                   block_size=block_size, seq_lens_t=seq_lens_t, query_len=query_len)

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0] if self.query_len is not None else len(self.seq_lens)

    @property
    def uniform_query_len(self) -> int | None:
        """The number of new tokens per sequence when all sequences have the same, else None."""
        if self.query_len is not None:
            return self.query_len
        q = self.query_start[1] - self.query_start[0]
        same = all(self.query_start[b + 1] - self.query_start[b] == q for b in range(self.num_seqs))
        return q if same else None

    @property
    def is_decode(self) -> bool:
        if self.query_len is not None:
            return self.query_len == 1
        return self.query_start[-1] == len(self.seq_lens)

    def decode_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, W * block_size] slots of every block in the tables, and the padding mask past each length.
        Computed once per batch and shared by all layers."""
        if self._decode is None:
            B, W = self.block_tables.shape
            offs = torch.arange(self.block_size, device=self.block_tables.device)
            slots = (self.block_tables[:, :, None] * self.block_size + offs).reshape(B, -1)
            pad = torch.arange(W * self.block_size, device=slots.device)[None, :] >= self.seq_lens_t[:, None]
            self._decode = (slots, pad)
        return self._decode

    def prefill_slots(self, b: int) -> torch.Tensor:
        """Slots of sequence b's whole context, computed once per batch and shared by all layers."""
        if b not in self._prefill:
            self._prefill[b] = self.slots_of(b, self.seq_lens[b])
        return self._prefill[b]

    def slots_of(self, b: int, length: int) -> torch.Tensor:
        """[length] flat slots holding the first `length` tokens of sequence b."""
        nblk = -(-length // self.block_size)
        blocks = self.block_tables[b, :nblk]
        offs = torch.arange(self.block_size, device=blocks.device)
        return (blocks[:, None] * self.block_size + offs[None, :]).reshape(-1)[:length]


def causal_latent_attention(q: torch.Tensor, kv: torch.Tensor, q_pos: torch.Tensor, scale: float,
                            value_dim: int) -> torch.Tensor:
    """Absorbed attention of one sequence.

    q: [T, H, D] queries in latent space (q_nope @ W_UK | q_pe); kv: [L, D] cached latents (c_kv | k_pe);
    q_pos: [T] positions of the queries (key j is visible to query t iff j <= q_pos[t]).
    Returns [T, H, value_dim]: attention-weighted c_kv (the first value_dim latent lanes).
    """
    T, H, _ = q.shape
    L = kv.shape[0]
    out = q.new_empty(T, H, value_dim)
    step = max(1, SCORE_BUDGET // max(1, H * L))
    keys = torch.arange(L, device=q.device)
    for s in range(0, T, step):
        e = min(T, s + step)
        visible = int(q_pos[e - 1].item()) + 1 if e - s > 0 else L
        kv_s = kv[:visible]
        scores = torch.einsum("thd,ld->thl", q[s:e], kv_s).float() * scale
        mask = keys[None, :visible] > q_pos[s:e, None]                    # [t, l]
        scores.masked_fill_(mask[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(kv.dtype)
        out[s:e] = torch.einsum("thl,lr->thr", probs, kv_s[:, :value_dim])
    return out


def kernel_query_len(q: torch.Tensor, cache: torch.Tensor, meta: PagedAttention) -> int | None:
    """The query length per sequence when the paged decode kernel serves this batch (every sequence computes the
    same few tokens, on CUDA with kernels enabled), else None: the PyTorch paths run."""
    if cache.dtype not in (torch.bfloat16, torch.float16, torch.float32) or not kernels.enabled(q):
        return None
    qlen = 1 if meta.is_decode else meta.uniform_query_len
    return qlen if qlen is not None and qlen <= KERNEL_MAX_QUERY_LEN else None


def _values(probs: torch.Tensor, kv: torch.Tensor, value_dim: int) -> torch.Tensor:
    """probs @ kv[..., :value_dim] -> [B, M, value_dim]. On the CPU in bf16/fp16 the product runs over the whole
    latent and the result is sliced: that batched GEMM copies a sliced (strided) operand first, which costs more
    than the extra rope lanes (about twice the product itself at batch 32); the values are the same. fp32 (MKL)
    takes the strided operand as it is."""
    # probs: [B, M, L]; kv: [B, L, D] with D >= value_dim
    if kv.device.type == "cpu" and kv.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(probs, kv)[..., :value_dim]
    return torch.bmm(probs, kv[..., :value_dim])


def paged_latent_attention(q: torch.Tensor, cache: torch.Tensor, meta: PagedAttention, scale: float,
                           value_dim: int) -> torch.Tensor:
    """Absorbed attention for a batch over the paged cache.

    q: [N, H, D]; cache: [num_blocks, block_size, D] (already holding this step's latents).
    Returns [N, H, value_dim].
    """
    qlen = kernel_query_len(q, cache, meta)
    if qlen is not None:
        # the Triton kernel (CUDA): reads the cache once through the block table, split over the
        # context; no gathered [B, L, D] copy, no [B, H, L] score tensor in memory
        from raymoe.platform.kernels.mla_decode import paged_mla_decode
        return paged_mla_decode(q, cache, meta.block_tables, meta.seq_lens_t, qlen, scale, value_dim)
    flat = cache.view(-1, cache.shape[-1])
    if meta.is_decode:
        # Reads every block of the table (its width is the batch's context bucket) and masks by seq_lens_t:
        # no host-side lengths, so the same code runs inside a CUDA graph.
        slots, pad = meta.decode_slots()
        kv = flat[slots]                                                    # [B, L, D]
        scores = torch.bmm(q, kv.transpose(1, 2)).float() * scale           # [B, H, L]
        scores.masked_fill_(pad[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(kv.dtype)
        return _values(probs, kv, value_dim)                                # [B, H, R]
    qlen = meta.uniform_query_len
    if qlen is not None and (qlen <= 16 or meta.query_len is not None):
        # every sequence computes the same few tokens (MTP verification, short chunks; any number for a batch
        # built by `PagedAttention.uniform`, which has no host lists for the per-sequence path): one batched product
        B, H, D = meta.num_seqs, q.shape[1], q.shape[2]
        slots, _ = meta.decode_slots()
        kv = flat[slots]                                                    # [B, L, D]
        L = kv.shape[1]
        scores = torch.bmm(q.view(B, qlen * H, D), kv.transpose(1, 2)).float().view(B, qlen, H, L) * scale
        pos = meta.seq_lens_t[:, None] - qlen + torch.arange(qlen, device=q.device)          # [B, q]
        hide = torch.arange(L, device=q.device)[None, None, :] > pos[:, :, None]              # [B, q, L]
        scores.masked_fill_(hide[:, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(kv.dtype).view(B, qlen * H, L)
        return _values(probs, kv, value_dim).view(B * qlen, H, value_dim)
    out = q.new_empty(q.shape[0], q.shape[1], value_dim)
    for b in range(meta.num_seqs):
        s, e = meta.query_start[b], meta.query_start[b + 1]
        if e == s:
            continue
        L = meta.seq_lens[b]
        kv = flat[meta.prefill_slots(b)]
        q_pos = torch.arange(L - (e - s), L, device=q.device)
        out[s:e] = causal_latent_attention(q[s:e], kv, q_pos, scale, value_dim)
    return out
