"""FP8 block quantisation as in the official DeepSeek-V3 checkpoint.

A float8_e4m3fn weight W8 [out, in] comes with `weight_scale_inv` S [ceil(out/B), ceil(in/B)] (B = 128) and means
W[i, j] = W8[i, j] * S[i // B, j // B]; edge blocks are partial. This module only converts tensors.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0


def dequantize_blockwise(w8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                         block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    # w8: [out, in] float8_e4m3fn; scale_inv: [ceil(out/bo), ceil(in/bi)] fp32 -> [out, in] dtype
    out, inp = w8.shape
    bo, bi = block
    expected = (-(-out // bo), -(-inp // bi))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"[{out}, {inp}] weight with {bo}x{bi} blocks")
    s = scale_inv.float().repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
    return (w8.float() * s).to(dtype)


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    # w: [out, in] -> (float8_e4m3fn [out, in], scale_inv fp32 [ceil(out/bo), ceil(in/bi)])
    out, inp = w.shape
    bo, bi = block
    nbo, nbi = -(-out // bo), -(-inp // bi)
    padded = torch.zeros(nbo * bo, nbi * bi, dtype=torch.float32)
    padded[:out, :inp] = w.float()
    blocks = padded.view(nbo, bo, nbi, bi)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(nbo * bo, nbi * bi)[:out, :inp].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv.contiguous()
