"""Load a Hugging Face DeepSeek-V3 checkpoint into raymoe's model.

Builds the model on the meta device, allocates it on the target device and dtype, and fills every parameter from
the checkpoint: FP8 weights are dequantised block-wise or, by `quantization` (`keeps_fp8`), kept as stored with
their block scales (the linears of `model/fp8.fp8_linear_names` become `Fp8Linear`s, the routed-expert stacks FP8;
kv_b_proj is always dequantised), per-expert tensors are stacked, MTP layer tensors are mapped, and only the
routed experts of `experts_range` are read (an expert-parallel shard never touches the bytes of other experts).
Routed experts may be stored per expert (the release) or fused (transformers'
`save_original_format=False`). A checkpoint with no MTP tensors at all (transformers' `save_pretrained`) loads
without MTP; anything else missing or mis-shaped raises `CheckpointError` naming the tensor.

`load_format="dummy"` reads config.json only (no safetensors file is opened, none need exist) and fills the
model with random weights of the real shapes and dtypes, made directly on the target device by the tiny
checkpoints' init rule (`tiny.random_init`): for memory, speed and plumbing runs of full-size models. With
`quantization="fp8"` (or a config declaring FP8 and "auto" on CUDA) those weights are made in FP8 with block scales,
exactly the layout an FP8 checkpoint loads into.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

from raymoe.platform.checkpoint.fp8 import dequantize_blockwise
from raymoe.platform.checkpoint.keymap import EXPERT_PARAMS, MTP_SHARED, expert_keys, hf_name, layer_of
from raymoe.platform.checkpoint.reader import CheckpointError, SafetensorsReader
from raymoe.platform.config import ModelConfig
from raymoe.platform.model.decoder import DeepseekV3ForCausalLM
from raymoe.platform.model.fp8 import fp8_linear_names, use_fp8
from raymoe.platform.model.moe import RoutedExperts

log = logging.getLogger(__name__)
LoadFormat = Literal["auto", "dummy"]
# auto: FP8 weights of an FP8 checkpoint stay FP8 on a CUDA device and are dequantised elsewhere; fp8: stay FP8
# on any device (the CPU computes by dequantising per call: slow, the reference); none: always dequantised.
Quantization = Literal["auto", "fp8", "none"]
_WARNED_NO_MTP: set[Path] = set()  # checkpoints already warned about in this process


def keeps_fp8(quantization: Quantization, declared_fp8: bool, device: str | torch.device) -> bool:
    """Whether a model (or an expert shard) of a checkpoint declaring FP8 weights (`declared_fp8`) keeps them in FP8
    on `device` under `quantization`. "fp8" on a checkpoint without FP8 weights raises."""
    if quantization not in ("auto", "fp8", "none"):
        raise ValueError(f"quantization must be 'auto', 'fp8' or 'none', got {quantization!r}")
    if quantization == "none":
        return False
    if quantization == "auto":
        return declared_fp8 and torch.device(device).type == "cuda"
    if not declared_fp8:
        raise CheckpointError("quantization 'fp8' keeps a checkpoint's FP8 weights in FP8, but config.json declares "
                              "no FP8 quantization_config (a bf16 checkpoint); use quantization 'auto' or 'none'")
    return True


def _block(cfg: ModelConfig, fp8: bool) -> tuple[int, int]:
    block = tuple(cfg.quantization_config.weight_block_size) if cfg.quantization_config else (128, 128)
    if fp8 and block != (128, 128):
        raise CheckpointError(f"FP8 weights are kept in FP8 with 128x128 blocks only; this checkpoint's "
                              f"weight_block_size is {list(block)} (use quantization 'none')")
    return block


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


def _read_fp8(reader: SafetensorsReader, key: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 weight `key` as stored: (e4m3 [out, in], weight_scale_inv fp32 [ceil(out/128), ceil(in/128)])."""
    t = reader.get(key)
    if t.dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"{reader.root}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}, expected "
                              f"float8_e4m3fn like the checkpoint's other FP8 weights")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{reader.root}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    scale_key = key[: -len("weight")] + "weight_scale_inv"
    if scale_key not in reader:
        raise CheckpointError(f"{reader.root}: FP8 tensor {key!r} has no {scale_key!r}")
    s = reader.get(scale_key)
    want = (-(-shape[0] // 128), -(-shape[1] // 128))
    if tuple(s.shape) != want:
        raise CheckpointError(f"{reader.root}: tensor {scale_key!r} has shape {tuple(s.shape)}, expected {want}")
    return t, s.float()


def fill_experts(reader: SafetensorsReader, prefix: str, experts: RoutedExperts, dtype: torch.dtype,
                 block: tuple[int, int]) -> set[str]:
    """Fill `experts` (held ids `experts.expert_ids`) from the per-expert tensors under HF `prefix`
    (`model.layers.L.mlp.experts`): dequantised into dense stacks, or as stored into FP8 stacks and their block
    scales (`experts.fp8`). Returns the keys read."""
    keys: set[str] = set()
    gu, down = experts.gate_up_proj, experts.down_proj
    inter, h = gu.shape[1] // 2, gu.shape[2]
    for local, e in enumerate(experts.expert_ids):
        gate_k, up_k = expert_keys(prefix, e, "gate_up_proj")
        (down_k,) = expert_keys(prefix, e, "down_proj")
        if experts.fp8:
            gs, ds = experts.gate_up_proj_scale_inv, experts.down_proj_scale_inv
            nb = gs.shape[1] // 2
            for half, key in enumerate((gate_k, up_k)):
                w8, s = _read_fp8(reader, key, (inter, h))
                gu[local, half * inter:(half + 1) * inter] = w8
                gs[local, half * nb:(half + 1) * nb] = s
            w8, s = _read_fp8(reader, down_k, tuple(down.shape[1:]))
            down[local], ds[local] = w8, s
        else:
            gu[local, :inter] = _read(reader, gate_k, (inter, h), dtype, block)
            gu[local, inter:] = _read(reader, up_k, (inter, h), dtype, block)
            down[local] = _read(reader, down_k, tuple(down.shape[1:]), dtype, block)
        keys.update((gate_k, up_k, down_k))
    return keys


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               experts_range: tuple[int, int] | None = None, config: ModelConfig | None = None,
               load_format: LoadFormat = "auto", seed: int = 0,
               quantization: Quantization = "none") -> DeepseekV3ForCausalLM:
    """Load the checkpoint at `path`. `experts_range=(a, b)` loads routed experts a..b-1 of every MoE layer only;
    (0, 0) loads none (the router of an expert-parallel model, whose experts live on shards). `load_format="dummy"`:
    config.json only, random weights from `seed` (see the module docstring). `quantization` (see `Quantization`;
    the engine's default is "auto", a plain load's "none": dequantised as always): whether the FP8 weights stay
    FP8 (`model/fp8.py`: the linears of the decoder blocks but kv_b_proj, and the routed experts)."""
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    cfg = config or ModelConfig.from_pretrained(path)
    if experts_range is not None:
        a, b = experts_range
        if not 0 <= a <= b <= cfg.n_routed_experts:   # a == b: no routed experts (an expert-parallel router)
            raise ValueError(f"experts_range {experts_range} is outside 0..{cfg.n_routed_experts}")
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    if load_format == "dummy":
        fp8 = quantization == "fp8" or keeps_fp8(quantization, cfg.quantization_config is not None, device)
        return _dummy_model(cfg, dtype, device, experts_range, seed, fp8)
    try:
        fp8 = keeps_fp8(quantization, cfg.quantization_config is not None, device)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    reader = SafetensorsReader(path)
    cfg = _without_absent_mtp(reader, cfg)
    block = _block(cfg, fp8)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg, experts_range)
    if fp8:
        _use_stored_fp8(reader, model)
    model.to_empty(device=device)
    model.to(dtype)  # the gates keep fp32 (Gate._apply), FP8 weights and their scales their dtypes
    n = cfg.num_hidden_layers
    consumed: set[str] = set()
    tensors = dict(model.named_parameters())
    tensors.update((k, v) for k, v in model.named_buffers() if k.endswith("e_score_correction_bias"))
    with torch.no_grad():
        for name, param in tensors.items():
            if ".mlp.experts." in name:                           # stacked experts: below, per module
                continue
            key = hf_name(name, n)
            if param.dtype == torch.float8_e4m3fn:                # an Fp8Linear: weight and scales as stored
                w8, s = _read_fp8(reader, key, tuple(param.shape))
                param.copy_(w8)
                tensors[f"{name}_scale_inv"].copy_(s)
                consumed.update((key, f"{key}_scale_inv"))
            elif not name.endswith("weight_scale_inv"):
                param.copy_(_read(reader, key, param.shape, param.dtype, block))
                consumed.add(key)
        for mod_name, experts in model.named_modules():
            if not isinstance(experts, RoutedExperts):
                continue
            prefix = hf_name(mod_name, n)
            if not experts.fp8 and all(_read_fused_experts(reader, f"{prefix}.{w}", getattr(experts, w),
                                                            experts.first, cfg.n_routed_experts)
                                       for w in EXPERT_PARAMS):
                consumed.update(f"{prefix}.{w}" for w in EXPERT_PARAMS)
                continue
            consumed |= fill_experts(reader, prefix, experts, dtype, block)
    _check_leftovers(reader, consumed, cfg)
    reader.close()
    model.eval()
    return model


def _use_stored_fp8(reader: SafetensorsReader, model: DeepseekV3ForCausalLM) -> None:
    """Hold in FP8 (model/fp8.py `use_fp8`) the weights this checkpoint stores in FP8: each linear of
    `fp8_linear_names` whose tensor is float8, and the routed experts if theirs are (the first held expert of the
    first MoE layer decides for all)."""
    n = model.config.num_hidden_layers
    linears = [m for m in fp8_linear_names(model)
               if f"{hf_name(m, n)}.weight" in reader and reader.is_fp8(f"{hf_name(m, n)}.weight")]
    experts = False
    for mod_name, mod in model.named_modules():
        if isinstance(mod, RoutedExperts) and mod.count:
            key = expert_keys(hf_name(mod_name, n), mod.expert_ids[0], "gate_up_proj")[0]
            experts = key in reader and reader.is_fp8(key)
            break
    use_fp8(model, linears, experts)


def _dummy_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device,
                 experts_range: tuple[int, int] | None, seed: int, fp8: bool) -> DeepseekV3ForCausalLM:
    """The model of `cfg` with random weights, allocated once on `device` (never materialised on the host); with
    `fp8`, the weights the release stores in FP8 made in FP8 with block scales (`use_fp8`), the experts too."""
    from raymoe.platform.checkpoint.tiny import random_init
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg, experts_range)
    if fp8:
        use_fp8(model, fp8_linear_names(model), experts=True)
    model.to_empty(device=device)
    model.to(dtype)  # the gates keep fp32 (Gate._apply), FP8 weights and their scales their dtypes
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
