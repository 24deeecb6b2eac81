"""Helpers for the multi-LoRA engine tests: PEFT adapters on a tiny checkpoint, and the merged-model reference."""
from __future__ import annotations

from pathlib import Path

import torch

from adapter_helpers import make_adapter, make_adapters  # noqa: F401 (re-exported for the engine tests)
from raymoe.platform.checkpoint.adapter import apply_adapter
from raymoe.platform.model import from_pretrained

# (targets, rank, alpha): four adapters that differ in what they adapt and how
KINDS = {
    "all4": (["all"], 4, 8.0),
    "attn8": (["attention"], 8, 16.0),
    "experts4": (["routed_experts", "shared_experts", "dense_mlp"], 4, 4.0),
    "all16": (["all"], 16, 8.0),
}


def merged_model(base: Path, adapter: Path | None, device: str = "cpu"):
    """The base model with one adapter merged into its weights (fp32): what a row with that adapter must equal."""
    model = from_pretrained(base, dtype=torch.float32, device=device)
    if adapter is not None:
        apply_adapter(model, adapter)
    return model
