"""Load routed experts only: any set of (MoE layer, expert) pairs, straight from an HF checkpoint.

What an expert-parallel shard holds. It reads the safetensors bytes of the requested experts and nothing else (no
attention, no embeddings, no other expert), dequantising FP8 blocks or keeping them in FP8 by the full loader's
rule (`quantization`), and returns one stacked `RoutedExperts` per layer. MTP layers are addressed by their
checkpoint layer index (num_hidden_layers + k), as the checkpoint and the model's MoE layers name them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from raymoe.platform.checkpoint.keymap import expert_keys
from raymoe.platform.checkpoint.loader import Quantization, _block, fill_experts, keeps_fp8
from raymoe.platform.checkpoint.reader import CheckpointError, SafetensorsReader
from raymoe.platform.config import ModelConfig
from raymoe.platform.model.moe import RoutedExperts


def load_experts(path: str | Path, experts: dict[int, list[int]], dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", config: ModelConfig | None = None,
                 quantization: Quantization = "none") -> tuple[dict[int, RoutedExperts], set[str]]:
    """{layer: expert ids} -> ({layer: RoutedExperts holding those ids}, the checkpoint keys read). `quantization`
    as `load_model`'s: under the same rule the stacks stay FP8 (`RoutedExperts.use_fp8`)."""
    cfg = config or ModelConfig.from_pretrained(path)
    moe_layers = {i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)}
    moe_layers |= {cfg.num_hidden_layers + k for k in range(cfg.num_nextn_predict_layers)}
    try:
        fp8 = keeps_fp8(quantization, cfg.quantization_config is not None, device)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    reader = SafetensorsReader(path)
    block = _block(cfg, fp8)
    out: dict[int, RoutedExperts] = {}
    with torch.no_grad():
        for layer, ids in sorted(experts.items()):
            if layer not in moe_layers:
                raise CheckpointError(f"{reader.root}: layer {layer} is not an MoE layer of this model")
            bad = [e for e in ids if not 0 <= e < cfg.n_routed_experts]
            if bad:
                raise CheckpointError(f"{reader.root}: expert {bad[0]} of layer {layer} is outside "
                                      f"0..{cfg.n_routed_experts - 1}")
            prefix = f"model.layers.{layer}.mlp.experts"
            with torch.device("meta"):
                mod = RoutedExperts(cfg, expert_ids=ids)
                if fp8 and ids and reader.is_fp8(expert_keys(prefix, mod.expert_ids[0], "gate_up_proj")[0]):
                    mod.use_fp8()
            mod.to_empty(device=device)
            mod.to(dtype)
            fill_experts(reader, prefix, mod, dtype, block)
            mod.requires_grad_(False)
            out[layer] = mod.eval()
    keys = set(reader.keys_read)
    reader.close()
    return out, keys
