"""Write a raymoe model as a Hugging Face DeepSeek-V3 checkpoint (config.json, safetensors shards + index).

The inverse of `loader.py`: stacked experts are split into per-expert keys, MTP modules become layers
num_hidden_layers + k (with the copies of embed_tokens and the head the release stores there), and with `fp8=True`
every Linear inside the layers is block-quantised exactly as the official release is. Routed experts are written
in `expert_files` files of contiguous expert ranges, so an expert-parallel shard's experts sit in files of their own.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from raymoe.platform.checkpoint.fp8 import quantize_blockwise
from raymoe.platform.checkpoint.keymap import expert_param, hf_name
from raymoe.platform.config import ModelConfig, QuantizationConfig
from raymoe.platform.model.decoder import DeepseekV3ForCausalLM

_NOT_FP8 = ("embed_tokens", "lm_head", "norm", "layernorm", "mlp.gate.", "eh_proj", "shared_head", "e_score")


def hf_tensors(model: DeepseekV3ForCausalLM) -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """(HF key, tensor, expert id or None) for every tensor of the checkpoint."""
    n = model.config.num_hidden_layers
    named = list(model.named_parameters()) + [
        (k, v) for k, v in model.named_buffers() if k.endswith("e_score_correction_bias")]
    for name, t in named:
        t = t.detach()
        ex = expert_param(name)
        if ex is None:
            yield hf_name(name, n), t, None
            continue
        prefix, which = ex
        prefix = hf_name(prefix, n)
        first = model.experts_range[0]
        for local in range(t.shape[0]):
            e = first + local
            if which == "gate_up_proj":
                gate, up = t[local].chunk(2, dim=0)
                yield f"{prefix}.{e}.gate_proj.weight", gate, e
                yield f"{prefix}.{e}.up_proj.weight", up, e
            else:
                yield f"{prefix}.{e}.down_proj.weight", t[local], e
    for k in range(len(model.mtp)):
        yield f"model.layers.{n + k}.embed_tokens.weight", model.model.embed_tokens.weight.detach(), None
        yield f"model.layers.{n + k}.shared_head.head.weight", model.lm_head.weight.detach(), None


def _is_fp8_target(key: str, t: torch.Tensor) -> bool:
    return key.startswith("model.layers.") and key.endswith(".weight") and t.dim() == 2 and \
        not any(s in key for s in _NOT_FP8)


def save_checkpoint(model: DeepseekV3ForCausalLM, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                    fp8: bool = False, expert_files: int = 2) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    if fp8:
        cfg = cfg.model_copy(update={"quantization_config": QuantizationConfig()})
    n_exp = cfg.n_routed_experts
    expert_files = max(1, min(expert_files, n_exp))
    per_file = -(-n_exp // expert_files)
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(1 + expert_files)]
    for key, t, expert in hf_tensors(model):
        g = 0 if expert is None else 1 + expert // per_file
        if key.endswith("e_score_correction_bias"):
            groups[g][key] = t.float().contiguous().cpu()
        elif fp8 and _is_fp8_target(key, t):
            q, s = quantize_blockwise(t.float().cpu())
            groups[g][key], groups[g][key[:-len("weight")] + "weight_scale_inv"] = q, s
        else:
            groups[g][key] = t.to(dtype).contiguous().cpu().clone()
    groups = [g for g in groups if g]
    weight_map: dict[str, str] = {}
    total = 0
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(g, str(out / fname), metadata={"format": "pt"})
        for k, v in g.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return out
