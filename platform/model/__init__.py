"""The DeepSeek-V3 network in PyTorch, and `from_pretrained`, the stable way to load it from an HF checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from raymoe.platform.model.attention import PagedAttention
from raymoe.platform.model.decoder import DeepseekV3ForCausalLM, MTPLayer
from raymoe.platform.model.moe import ExpertDispatch, Gate, LocalDispatch, MoE, RoutedExperts


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    experts_range: tuple[int, int] | None = None, load_format: str = "auto",
                    seed: int = 0, quantization: str = "none") -> DeepseekV3ForCausalLM:
    """Load an HF DeepSeek-V3 checkpoint (bf16 or FP8, single or sharded) as a raymoe model in eval mode.
    `load_format="dummy"`: config.json only, random weights from `seed`; `quantization` "auto" | "fp8" | "none"
    (default): whether FP8 weights stay FP8 (checkpoint/loader.py)."""
    from raymoe.platform.checkpoint.loader import load_model
    return load_model(path, dtype=dtype, device=device, experts_range=experts_range, load_format=load_format,
                      seed=seed, quantization=quantization)


__all__ = ["DeepseekV3ForCausalLM", "ExpertDispatch", "Gate", "LocalDispatch", "MTPLayer", "MoE", "PagedAttention", "RoutedExperts",
           "from_pretrained"]
