"""The map between raymoe parameter names and Hugging Face DeepSeek-V3 checkpoint keys.

raymoe names mirror HF's, with two differences: routed experts are stacked per layer
(`...mlp.experts.gate_up_proj [E, 2I, H]`, `...mlp.experts.down_proj [E, H, I]`, as transformers 5 holds them in
memory) while the checkpoint stores `...mlp.experts.{e}.{gate,up,down}_proj.weight` per expert; and MTP module k
lives at `mtp.{k}` (its decoder block at `mtp.{k}.block`) while the checkpoint calls it `model.layers.{n + k}`.
"""
from __future__ import annotations

import re

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
# Tensors stored under each MTP layer that raymoe shares with the main model instead of holding twice.
MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")
_MTP = re.compile(r"^mtp\.(\d+)\.(block\.)?(.*)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def hf_name(name: str, num_layers: int) -> str:
    """raymoe name -> HF key (for everything but stacked experts, whose prefix it returns)."""
    m = _MTP.match(name)
    if m:
        return f"model.layers.{num_layers + int(m.group(1))}.{m.group(3)}"
    return name


def expert_param(name: str) -> tuple[str, str] | None:
    """For a stacked-expert parameter name: (HF prefix `model.layers.L.mlp.experts`, which)."""
    for which in EXPERT_PARAMS:
        if name.endswith(f".mlp.experts.{which}"):
            return name[: -len(which) - 1], which
    return None


def expert_keys(prefix: str, expert: int, which: str) -> list[str]:
    """HF keys of one expert for one stacked parameter (gate_up_proj reads gate then up)."""
    if which == "gate_up_proj":
        return [f"{prefix}.{expert}.gate_proj.weight", f"{prefix}.{expert}.up_proj.weight"]
    return [f"{prefix}.{expert}.down_proj.weight"]


def parse_expert_key(key: str) -> tuple[str, int, str] | None:
    """HF per-expert key -> (prefix, expert id, gate_proj|up_proj|down_proj)."""
    m = _EXPERT_KEY.match(key)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def layer_of(key: str) -> int | None:
    m = _LAYER.match(key)
    return int(m.group(1)) if m else None
