"""Rotary position embedding with YaRN frequency scaling, as DeepSeek-V3 and transformers compute it.

Owns the inverse frequencies and the rotation. Checkpoint rope rows are interleaved (pairs x[2i], x[2i+1] rotate
together); with `rope_interleave` the rotation reads even/odd lanes and writes the de-interleaved layout
[x_even' | x_odd'], exactly as transformers does, so cached k_pe and q_pe share one layout. Rotation runs in fp32.
"""
from __future__ import annotations

import math

import torch

from raymoe.platform.config import ModelConfig


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[dim/2] fp32 inverse frequencies; YaRN-blended when rope_scaling is set."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extra = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if rs is None:
        return extra
    inter = 1.0 / (rs.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # share of the original (extrapolated) frequency
    return inter * (1 - keep) + extra * keep


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE in fp32 (also inside the training step's fused rope_query, platform.model.fused)."""
    # x: [N, heads, dim] or [N, dim]; cos/sin: [N, dim/2] fp32 -> rotated x (de-interleaved layout), x.dtype
    xf = x.float()
    if xf.dim() == 3:
        cos, sin = cos[:, None, :], sin[:, None, :]
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        half = xf.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class RotaryEmbedding:
    """Holds fp32 inverse frequencies (not a Module, so casting the model to bf16 never rounds them)."""

    def __init__(self, cfg: ModelConfig) -> None:
        with torch.device("cpu"):  # never on meta, even when the model is built there
            self.inv_freq = yarn_inv_freq(cfg)
        self.attention_factor = cfg.rope_attention_factor
        self.interleaved = cfg.rope_interleave

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [N] -> cos, sin: [N, dim/2] fp32
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [N, heads, dim] (or [N, dim]); cos/sin: [N, dim/2] -> rotated x, de-interleaved layout, x.dtype
        return rotate(x, cos, sin, self.interleaved)
