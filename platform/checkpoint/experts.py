"""Load routed experts only: any set of (MoE layer, expert) pairs, straight from an HF checkpoint.

What an expert-parallel shard holds. It reads the safetensors bytes of the requested experts and nothing else (no
attention, no embeddings, no other expert), dequantising FP8 blocks as the full loader does, and returns one stacked
`RoutedExperts` per layer. MTP layers are addressed by their checkpoint layer index (num_hidden_layers + k), as the
checkpoint and the model's MoE layers name them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from raymoe.platform.checkpoint.keymap import expert_keys
from raymoe.platform.checkpoint.loader import _read
from raymoe.platform.checkpoint.reader import CheckpointError, SafetensorsReader
from raymoe.platform.config import ModelConfig
from raymoe.platform.model.moe import RoutedExperts


def load_experts(path: str | Path, experts: dict[int, list[int]], dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", config: ModelConfig | None = None
                 ) -> tuple[dict[int, RoutedExperts], set[str]]:
    """{layer: expert ids} -> ({layer: RoutedExperts holding those ids}, the checkpoint keys read)."""
    cfg = config or ModelConfig.from_pretrained(path)
    moe_layers = {i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)}
    moe_layers |= {cfg.num_hidden_layers + k for k in range(cfg.num_nextn_predict_layers)}
    reader = SafetensorsReader(path)
    block = tuple(cfg.quantization_config.weight_block_size) if cfg.quantization_config else (128, 128)
    out: dict[int, RoutedExperts] = {}
    with torch.no_grad():
        for layer, ids in sorted(experts.items()):
            if layer not in moe_layers:
                raise CheckpointError(f"{reader.root}: layer {layer} is not an MoE layer of this model")
            bad = [e for e in ids if not 0 <= e < cfg.n_routed_experts]
            if bad:
                raise CheckpointError(f"{reader.root}: expert {bad[0]} of layer {layer} is outside "
                                      f"0..{cfg.n_routed_experts - 1}")
            with torch.device("meta"):
                mod = RoutedExperts(cfg, expert_ids=ids)
            mod.to_empty(device=device)
            mod.to(dtype)
            prefix = f"model.layers.{layer}.mlp.experts"
            inter = mod.gate_up_proj.shape[1] // 2
            for local, e in enumerate(mod.expert_ids):
                gate, up = expert_keys(prefix, e, "gate_up_proj")
                (down,) = expert_keys(prefix, e, "down_proj")
                shape = (inter, mod.gate_up_proj.shape[2])
                mod.gate_up_proj[local, :inter] = _read(reader, gate, shape, dtype, block)
                mod.gate_up_proj[local, inter:] = _read(reader, up, shape, dtype, block)
                mod.down_proj[local] = _read(reader, down, tuple(mod.down_proj.shape[1:]), dtype, block)
            mod.requires_grad_(False)
            out[layer] = mod.eval()
    keys = set(reader.keys_read)
    reader.close()
    return out, keys
