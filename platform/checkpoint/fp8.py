"""FP8 block quantisation as in the official DeepSeek-V3 checkpoint: the checkpoint side's name for the tensor
conversions, which live with the model's FP8 layers (platform/model/fp8.py) since the model dequantises too.

A float8_e4m3fn weight W8 [out, in] comes with `weight_scale_inv` S [ceil(out/B), ceil(in/B)] (B = 128) and means
W[i, j] = W8[i, j] * S[i // B, j // B]; edge blocks are partial.
"""
from __future__ import annotations

from raymoe.platform.model.fp8 import FP8_MAX, dequantize_blockwise, quantize_blockwise

__all__ = ["FP8_MAX", "dequantize_blockwise", "quantize_blockwise"]
