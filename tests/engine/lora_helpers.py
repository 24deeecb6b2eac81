"""Helpers for the multi-LoRA engine tests: PEFT adapters on a tiny checkpoint, and the merged-model reference."""
from __future__ import annotations

from pathlib import Path

import torch

from raymoe.finetune.config import LoraConfigSpec
from raymoe.finetune.lora import apply_lora, plan_lora, save_adapter
from raymoe.platform.checkpoint.adapter import apply_adapter
from raymoe.platform.model import from_pretrained

# (targets, rank, alpha): four adapters that differ in what they adapt and how
KINDS = {
    "all4": (["all"], 4, 8.0),
    "attn8": (["attention"], 8, 16.0),
    "experts4": (["routed_experts", "shared_experts", "dense_mlp"], 4, 4.0),
    "all16": (["all"], 16, 8.0),
}


def make_adapter(base: Path, out: Path, targets: list[str], rank: int, alpha: float, seed: int,
                 std: float = 0.15) -> Path:
    """A PEFT adapter trained by nobody: real PEFT wrapping and saving on the raymoe model, factors random (a
    fresh adapter has B = 0 and would change nothing)."""
    model = from_pretrained(base, dtype=torch.float32)
    spec = LoraConfigSpec(rank=rank, alpha=alpha, targets=targets)
    pm = apply_lora(model, spec, plan_lora(model, spec), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return save_adapter(pm, out, str(base))


def merged_model(base: Path, adapter: Path | None, device: str = "cpu"):
    """The base model with one adapter merged into its weights (fp32): what a row with that adapter must equal."""
    model = from_pretrained(base, dtype=torch.float32, device=device)
    if adapter is not None:
        apply_adapter(model, adapter)
    return model
