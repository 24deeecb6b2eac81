"""PEFT LoRA adapters for raymoe models: read an adapter directory, merge it into a model's weights (and out again).

Owns the PEFT on-disk format as PEFT 0.21 writes it for DeepSeek-V3 module names (adapter_config.json +
adapter_model.safetensors, keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`):
- module LoRA on an nn.Linear (`target_modules`): W [out, in] += s * B [out, r] @ A [r, in];
- parameter LoRA (`target_parameters`) on a 2-D weight: the same; on stacked routed experts [E, out, in]:
  A [E * r, in] and B [out, E * r] hold expert e's factors at A.view(E, r, in)[e] and B.view(out, r, E)[..., e];
  several targeted parameters of one module nest (`experts.lora_A`, `experts.base_layer.lora_A`), and each key is
  matched to its parameter by shape;
- `modules_to_save` tensors (e.g. gates with a trained e_score_correction_bias) replace the model's.
with s = lora_alpha / r (or / sqrt(r) with use_rslora). It never imports PEFT, so serving can merge adapters
without the training stack; expert-parallel shards (RoutedExperts holding experts [first, first + count)) take
their slice of the expert deltas. DoRA, LoRA biases and rank/alpha patterns are refused with a clear error.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from raymoe.platform.checkpoint.reader import CheckpointError

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclass
class LoraFactors:
    """One adapted weight of `module`: A [E * r, in], B [out, E * r] (E = 1 for a 2-D weight)."""

    module: str                 # model module path (PEFT's `.base_layer` nesting removed)
    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    def delta(self, experts: int = 1) -> torch.Tensor:
        # -> [out, in] or [E, out, in] fp32
        a, b = self.A.float(), self.B.float()
        if experts == 1:
            return (b @ a) * self.scaling
        a, b = expert_factors(a, b, experts)
        return torch.bmm(b, a) * self.scaling


def expert_factors(A: torch.Tensor, B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's stacked-expert factors per expert (views, so gradients flow): A [E * r, in] is expert-major,
    B [out, r * E] rank-major (column j * E + e is rank j of expert e) -> a [E, r, in], b [E, out, r]."""
    a = A.view(experts, -1, A.shape[-1])
    b = B.view(B.shape[0], -1, experts).permute(2, 0, 1)
    return a, b


@dataclass
class LoraAdapter:
    path: Path
    config: dict
    factors: list[LoraFactors] = field(default_factory=list)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)     # modules_to_save: model name -> tensor

    @property
    def name(self) -> str:
        return self.path.name


def read_adapter(path: str | Path) -> LoraAdapter:
    root = Path(path)
    cfg_file, weights = root / "adapter_config.json", root / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{root}: not a PEFT adapter (needs adapter_config.json and adapter_model.safetensors)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type {config.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise CheckpointError(f"{cfg_file}: {key} is not supported")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_file}: LoRA biases are not supported")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(weights))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    adapter = LoraAdapter(root, config)
    for key, t in tensors.items():
        name = key.removeprefix(_PREFIX)
        m = _LORA_KEY.match(name)
        if m is None:
            adapter.replaced[name] = t
            continue
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{weights}: {module} has lora_{''.join(ab)} without its pair")
        adapter.factors.append(LoraFactors(module, ab["A"], ab["B"], scaling))
    return adapter


def _target(model: nn.Module, f: LoraFactors, adapter: LoraAdapter) -> tuple[str, nn.Parameter, int]:
    """(parameter name, parameter, experts in the adapter) that factors `f` adapt, matched by shape."""
    module_name = f.module.replace(".base_layer", "")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise CheckpointError(f"{adapter.path}: the model has no module {module_name!r}") from None
    out_f, in_f = f.B.shape[0], f.A.shape[1]
    for pname, p in module.named_parameters(recurse=False):
        if p.dim() == 2 and tuple(p.shape) == (out_f, in_f):
            return f"{module_name}.{pname}", p, 1
        if p.dim() == 3 and tuple(p.shape[1:]) == (out_f, in_f):
            experts = getattr(module, "n_total", p.shape[0])
            if f.A.shape[0] % experts == 0:
                return f"{module_name}.{pname}", p, experts
    raise CheckpointError(f"{adapter.path}: no weight of {module_name!r} fits LoRA factors "
                          f"A {tuple(f.A.shape)}, B {tuple(f.B.shape)}")


def adapter_targets(model: nn.Module, adapter: LoraAdapter) -> list[tuple[str, LoraFactors, int]]:
    """(parameter name, factors, experts in the adapter) of every adapted weight, checked against `model`'s
    modules and shapes (CheckpointError naming the module that does not fit)."""
    return [(name, f, experts) for f in adapter.factors for name, _, experts in [_target(model, f, adapter)]]


def merge_adapter(model: nn.Module, adapter: LoraAdapter, sign: float = 1.0) -> dict[str, torch.Tensor]:
    """W += sign * delta for every adapted weight, in place; modules_to_save tensors are swapped in.
    Returns the tensors that were replaced (pass them to `unmerge_adapter` to restore the base exactly up to
    rounding)."""
    originals: dict[str, torch.Tensor] = {}
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        targets = [_target(model, f, adapter) for f in adapter.factors]
        fp8 = [name for name, p, _ in targets if p.dtype == torch.float8_e4m3fn]
        if fp8:                                  # checked before any weight changes
            raise CheckpointError(f"{adapter.path}: cannot merge into {fp8[0]}, held in FP8 (load the model with "
                                  f"quantization 'none' to merge, or serve the adapter per request)")
        for f, (name, p, experts) in zip(adapter.factors, targets):
            if experts == 1:
                p.add_((sign * f.delta()).to(p.device, p.dtype))
                continue
            first = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "first", 0)
            a, b = expert_factors(f.A, f.B, experts)
            step = 8          # a few experts at a time: a full-width stack's fp32 delta would be tens of GB
            for e in range(0, p.shape[0], step):
                g = slice(first + e, first + min(e + step, p.shape[0]))             # this shard's experts
                d = torch.bmm(b[g].float().to(p.device), a[g].float().to(p.device)) * (sign * f.scaling)
                p[e:e + d.shape[0]].add_(d.to(p.dtype))
        for name, t in adapter.replaced.items():
            if name not in named:
                raise CheckpointError(f"{adapter.path}: the model has no tensor {name!r} (modules_to_save)")
            target = named[name]
            if sign > 0:
                originals[name] = target.detach().clone()
                target.copy_(t.to(target.dtype))
    return originals


def unmerge_adapter(model: nn.Module, adapter: LoraAdapter, originals: dict[str, torch.Tensor]) -> None:
    merge_adapter(model, adapter, sign=-1.0)
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, t in originals.items():
            named[name].copy_(t)


def apply_adapter(model: nn.Module, path: str | Path) -> LoraAdapter:
    """Read the adapter at `path` and merge it into `model`; returns it."""
    adapter = read_adapter(path)
    merge_adapter(model, adapter)
    return adapter
