"""Multi-head Latent Attention (MLA), DeepSeek-V3's attention with a compressed latent KV cache.

Owns the attention projections (HF names: q_a_proj, q_a_layernorm, q_b_proj or q_proj, kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj, o_proj) and three equivalent ways to run them:
- naive: expand the latent with kv_b_proj into per-head keys/values (what transformers does; the reference);
- absorbed: fold kv_b_proj into the query and the output so attention runs over the 576-value latent directly;
- cached: the absorbed path over a paged latent cache (what the engine uses).
The cache holds c_kv after kv_a_layernorm and k_pe after RoPE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.platform.config import ModelConfig
from raymoe.platform.model import fused
from raymoe.platform.model.multi_lora import LoraLinear, LoraRows
from raymoe.platform.model.attention import PagedAttention, causal_latent_attention, paged_latent_attention
from raymoe.platform.model.norm import RMSNorm
from raymoe.platform.model.rope import RotaryEmbedding


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.scale = cfg.softmax_scale
        h, bias = cfg.hidden_size, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=bias)
        object.__setattr__(self, "rope", rope)  # shared and unregistered: no weights, and .to(dtype) must not touch it

    # ---- projections ---------------------------------------------------------------------------------------------
    def _query(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, hidden] -> q [N, H, nope + rope], before RoPE
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(-1, self.n_heads, self.qk_head_dim)

    def _latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [N, hidden]; cos/sin: [N, rope/2] -> [N, kv_lora_rank + rope] (normed c_kv | rotated k_pe)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(c_kv), self.rope.rotate(k_pe, cos, sin)], dim=-1)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [N, hidden]; positions: [N]
        # -> q_nope [N, H, nope], q_pe [N, H, rope] (rotated), latent [N, kv_lora_rank + rope] (normed c_kv | k_pe)
        q_nope, q_pe = self._query(x).split([self.nope_dim, self.rope_dim], dim=-1)
        cos, sin = self.rope.cos_sin(positions)
        return q_nope, self.rope.rotate(q_pe, cos, sin), self._latent(x, cos, sin)

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]   # [H, nope, R], [H, v, R]

    def _row_lora(self) -> tuple[LoraRows, torch.Tensor, torch.Tensor] | None:
        """kv_b_proj's per-row LoRA, when rows are bound: (rows, a [S, r, R], b [S, H, nope + v, r])."""
        kv_b = self.kv_b_proj
        if not isinstance(kv_b, LoraLinear) or kv_b.rows.slots is None:
            return None
        b = kv_b.lora_b
        return kv_b.rows, kv_b.lora_a, b.view(b.shape[0], self.n_heads, self.nope_dim + self.v_dim, b.shape[-1])

    def absorb_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        # q_nope: [N, H, nope], q_pe: [N, H, rope] -> [N, H, R + rope]
        w_uk, _ = self._w_uk_uv()
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)        # per head: [N, nope] @ [nope, R]
        lora = self._row_lora()
        if lora is not None:     # kv_b_proj's LoRA absorbed per row: q_h (W_uk,h + B_uk,h A) = q_lat + (q_h B_uk,h) A
            rows, a, b = lora
            N, H, _ = q_nope.shape
            dt = q_nope.dtype
            b_uk = b[:, :, :self.nope_dim].reshape(-1, self.nope_dim, b.shape[-1]).to(dt)     # [S * H, nope, r]
            seg = rows.head_slots
            low = seg.unsort(torch.where(seg.held, seg.mm(seg.sort(q_nope.reshape(N * H, -1)), b_uk), 0))
            seg = rows.token_heads
            d = torch.where(seg.held, seg.mm(seg.sort(low), a.to(dt)), 0)                         # [N * H, R]
            q_lat = seg.add_to(q_lat.reshape(N * H, -1), d).view(N, H, -1)
        return torch.cat([q_lat, q_pe], dim=-1)

    def absorb_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        # o_lat: [N, H, R] -> [N, hidden]
        _, w_uv = self._w_uk_uv()
        o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)   # per head: [N, R] @ [R, v]
        lora = self._row_lora()
        if lora is not None:     # o_h += (o_lat,h A^T) B_uv,h^T
            rows, a, b = lora
            N, H, _ = o_lat.shape
            dt = o_lat.dtype
            b_uv = b[:, :, self.nope_dim:].reshape(-1, self.v_dim, b.shape[-1]).to(dt)        # [S * H, v, r]
            seg = rows.token_heads
            low = seg.unsort(torch.where(seg.held, seg.mm(seg.sort(o_lat.reshape(N * H, -1)),
                                                          a.to(dt).transpose(1, 2)), 0))      # [N * H, r]
            seg = rows.head_slots
            d = torch.where(seg.held, seg.mm(seg.sort(low), b_uv.transpose(1, 2)), 0)        # [N * H, v]
            o = seg.add_to(o.reshape(N * H, -1).contiguous(), d).view(N, H, -1)
        return self.o_proj(o.reshape(o.shape[0], -1))

    # ---- the three paths -----------------------------------------------------------------------------------------
    def forward_naive(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, T, hidden]; positions: [B, T] -> [B, T, hidden]; full causal attention, no cache
        # (the training path: RoPE on q and the per-head keys are one fused kernel each when training on a GPU)
        B, T, _ = x.shape
        x = x.reshape(B * T, -1)
        cos, sin = self.rope.cos_sin(positions.reshape(-1))
        q = fused.rope_query(self._query(x), cos, sin, self.nope_dim, self.rope.interleaved)   # [N, H, nope+rope]
        c_kv, k_pe = self._latent(x, cos, sin).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B * T, self.n_heads, self.nope_dim + self.v_dim)
        k, v = fused.expand_kv(kv, k_pe, self.nope_dim)                       # [N, H, nope+rope], [N, H, v]
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def forward_absorbed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, T, hidden]; positions: [B, T] -> [B, T, hidden]; absorbed attention over contiguous latents
        B, T, _ = x.shape
        q_nope, q_pe, latent = self.project(x.reshape(B * T, -1), positions.reshape(-1))
        q = self.absorb_query(q_nope, q_pe).view(B, T, self.n_heads, -1)
        latent = latent.view(B, T, -1)
        o_lat = torch.stack([causal_latent_attention(q[b], latent[b], positions[b], self.scale, self.kv_lora_rank)
                             for b in range(B)])
        return self.absorb_output(o_lat.view(B * T, self.n_heads, -1)).view(B, T, -1)

    def forward_cached(self, x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
                       meta: PagedAttention) -> torch.Tensor:
        # x: [N, hidden]; positions: [N]; cache: [num_blocks, block_size, R + rope] -> [N, hidden]
        q_nope, q_pe, latent = self.project(x, positions)
        cache.view(-1, cache.shape[-1]).index_copy_(0, meta.slot_mapping, latent.to(cache.dtype))
        q = self.absorb_query(q_nope, q_pe)
        o_lat = paged_latent_attention(q.to(cache.dtype), cache, meta, self.scale, self.kv_lora_rank)
        return self.absorb_output(o_lat.to(x.dtype))
