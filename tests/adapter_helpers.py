"""One maker of test LoRA adapters, shared by the engine and serving tests: real PEFT wrapping and saving on the
raymoe model (finetune's own set-up), with random factors so the adapter changes the model's answers (a fresh
adapter has B = 0 and would change nothing)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def make_adapter(base: Path, out: Path, targets: Sequence[str] = ("all",), rank: int = 4, alpha: float | None = None,
                 seed: int = 0, std: float = 0.15) -> Path:
    """A PEFT adapter for the checkpoint `base` at `out` (alpha: 2 x rank unless given); returns its folder."""
    import torch

    from raymoe.finetune.config import LoraConfigSpec
    from raymoe.finetune.lora import apply_lora, plan_lora, save_adapter
    from raymoe.platform.model import from_pretrained
    spec = LoraConfigSpec(rank=rank, alpha=2 * rank if alpha is None else alpha, targets=list(targets))
    model = from_pretrained(base, dtype=torch.float32)
    pm = apply_lora(model, spec, plan_lora(model, spec), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return save_adapter(pm, out, str(base))


def make_adapters(base: Path, root: Path, kinds: dict[str, tuple[Sequence[str], int, float]],
                  first_seed: int = 1) -> dict[str, Path]:
    """One adapter per entry of `kinds` (name -> (targets, rank, alpha)) under `root`, seeds counting from
    `first_seed`: {name: folder}."""
    return {name: make_adapter(base, root / name, t, r, a, seed=first_seed + i)
            for i, (name, (t, r, a)) in enumerate(kinds.items())}
