"""Load a Hugging Face DeepSeek-V3 checkpoint into raymoe's model.

Builds the model on the meta device, allocates it on the target device and dtype, and fills every parameter from
the checkpoint: FP8 weights are dequantised block-wise, per-expert tensors are stacked, MTP layer tensors are
mapped, and only the routed experts of `experts_range` are read (an expert-parallel shard never touches the bytes
of other experts). Routed experts may be stored per expert (the release) or fused (transformers'
`save_original_format=False`). A checkpoint with no MTP tensors at all (transformers' `save_pretrained`) loads
without MTP; anything else missing or mis-shaped raises `CheckpointError` naming the tensor.

`load_format="dummy"` reads config.json only (no safetensors file is opened, none need exist) and fills the
model with random weights of the real shapes and dtypes, made directly on the target device by the tiny
checkpoints' init rule (`tiny.random_init`): for memory, speed and plumbing runs of full-size models.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

from raymoe.platform.checkpoint.fp8 import dequantize_blockwise
from raymoe.platform.checkpoint.keymap import MTP_SHARED, expert_keys, expert_param, hf_name, layer_of
from raymoe.platform.checkpoint.reader import CheckpointError, SafetensorsReader
from raymoe.platform.config import ModelConfig
from raymoe.platform.model.decoder import DeepseekV3ForCausalLM

log = logging.getLogger(__name__)
LoadFormat = Literal["auto", "dummy"]
_WARNED_NO_MTP: set[Path] = set()  # checkpoints already warned about in this process


def _read(reader: SafetensorsReader, key: str, shape: tuple[int, ...], dtype: torch.dtype,
          block: tuple[int, int]) -> torch.Tensor:
    t = reader.get(key)
    if t.dtype == torch.float8_e4m3fn:
        scale_key = key[: -len("weight")] + "weight_scale_inv"
        if scale_key not in reader:
            raise CheckpointError(f"{reader.root}: FP8 tensor {key!r} has no {scale_key!r}")
        try:
            t = dequantize_blockwise(t, reader.get(scale_key), dtype, block)
        except ValueError as e:
            raise CheckpointError(f"{reader.root}: {scale_key!r}: {e}") from None
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{reader.root}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t.to(dtype)


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               experts_range: tuple[int, int] | None = None, config: ModelConfig | None = None,
               load_format: LoadFormat = "auto", seed: int = 0) -> DeepseekV3ForCausalLM:
    """Load the checkpoint at `path`. `experts_range=(a, b)` loads routed experts a..b-1 of every MoE layer only;
    (0, 0) loads none (the router of an expert-parallel model, whose experts live on shards). `load_format="dummy"`:
    config.json only, random weights from `seed` (see the module docstring)."""
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    cfg = config or ModelConfig.from_pretrained(path)
    if experts_range is not None:
        a, b = experts_range
        if not 0 <= a <= b <= cfg.n_routed_experts:   # a == b: no routed experts (an expert-parallel router)
            raise ValueError(f"experts_range {experts_range} is outside 0..{cfg.n_routed_experts}")
    if load_format == "dummy":
        return _dummy_model(cfg, dtype, device, experts_range, seed)
    if load_format != "auto":
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    reader = SafetensorsReader(path)
    cfg = _without_absent_mtp(reader, cfg)
    block = tuple(cfg.quantization_config.weight_block_size) if cfg.quantization_config else (128, 128)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg, experts_range)
    model.to_empty(device=device)
    model.to(dtype)  # the gates keep fp32 (Gate._apply)
    n = cfg.num_hidden_layers
    consumed: set[str] = set()
    tensors = dict(model.named_parameters())
    tensors.update((k, v) for k, v in model.named_buffers() if k.endswith("e_score_correction_bias"))
    with torch.no_grad():
        for name, param in tensors.items():
            ex = expert_param(name)
            if ex is None:
                key = hf_name(name, n)
                param.copy_(_read(reader, key, param.shape, param.dtype, block))
                consumed.add(key)
                continue
            prefix, which = ex
            prefix = hf_name(prefix, n)
            first = model.experts_range[0]
            if _read_fused_experts(reader, f"{prefix}.{which}", param, first, cfg.n_routed_experts):
                consumed.add(f"{prefix}.{which}")
                continue
            for local in range(param.shape[0]):
                keys = expert_keys(prefix, first + local, which)
                if which == "gate_up_proj":
                    inter = param.shape[1] // 2
                    param[local, :inter] = _read(reader, keys[0], (inter, param.shape[2]), param.dtype, block)
                    param[local, inter:] = _read(reader, keys[1], (inter, param.shape[2]), param.dtype, block)
                else:
                    param[local] = _read(reader, keys[0], param.shape[1:], param.dtype, block)
                consumed.update(keys)
    _check_leftovers(reader, consumed, cfg)
    reader.close()
    model.eval()
    return model


def _dummy_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device,
                 experts_range: tuple[int, int] | None, seed: int) -> DeepseekV3ForCausalLM:
    """The model of `cfg` with random weights, allocated once on `device` (never materialised on the host)."""
    from raymoe.platform.checkpoint.tiny import random_init
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg, experts_range)
    model.to_empty(device=device)
    model.to(dtype)  # the gates keep fp32 (Gate._apply)
    random_init(model, seed)
    model.eval()
    return model


def _without_absent_mtp(reader: SafetensorsReader, cfg: ModelConfig) -> ModelConfig:
    """`cfg` without MTP modules if the checkpoint holds no tensor of any layer >= num_hidden_layers.

    transformers' `save_pretrained` writes DeepSeek-V3 without its MTP layer yet keeps num_nextn_predict_layers in
    config.json. Such a checkpoint loads without MTP (warned once per process per path). A checkpoint with some MTP
    tensors is loaded as declared, so a missing one still raises naming it.
    """
    n = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers == 0 or any((layer_of(k) or 0) >= n for k in reader.keys()):
        return cfg
    root = reader.root.resolve()
    if root not in _WARNED_NO_MTP:
        _WARNED_NO_MTP.add(root)
        log.warning("%s: config.json declares %d MTP layer(s) but the checkpoint has no MTP weights (no "
                    "model.layers.%d.*); loading without MTP, so MTP speculation is unavailable",
                    reader.root, cfg.num_nextn_predict_layers, n)
    return cfg.model_copy(update={"num_nextn_predict_layers": 0})


def _read_fused_experts(reader: SafetensorsReader, key: str, param: torch.Tensor, first: int, total: int) -> bool:
    """Fill stacked `param` [E_local, ...] from a fused `...mlp.experts.{gate_up_proj,down_proj}` [E, ...] tensor
    (what `save_pretrained(save_original_format=False)` writes), reading only experts first..first+E_local-1.
    False if the checkpoint does not hold `key` (the per-expert layout)."""
    if key not in reader:
        return False
    shape = reader.shape(key)
    if shape != (total, *param.shape[1:]):
        raise CheckpointError(f"{reader.root}: tensor {key!r} has shape {shape}, expected {(total, *param.shape[1:])}")
    rows = reader.get_rows(key, first, first + param.shape[0])
    if rows.dtype == torch.float8_e4m3fn:
        raise CheckpointError(f"{reader.root}: tensor {key!r}: FP8 fused experts are not supported")
    param.copy_(rows.to(param.dtype))
    return True


def _check_leftovers(reader: SafetensorsReader, consumed: set[str], cfg: ModelConfig) -> None:
    """Keys nobody read: other shards' experts and MTP copies are expected; a layer beyond the config is not."""
    limit = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    for key in reader.keys():
        if key in consumed or key.endswith("weight_scale_inv") or ".mlp.experts." in key:
            continue
        layer = layer_of(key)
        if layer is not None and layer >= cfg.num_hidden_layers and key.split(f"layers.{layer}.", 1)[1] in MTP_SHARED:
            continue
        if layer is not None and layer >= limit:
            raise CheckpointError(f"{reader.root}: tensor {key!r} belongs to layer {layer}, but the config has "
                                  f"{cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP")
        log.warning("checkpoint tensor %s is not used by raymoe", key)
