"""Module LoRA on nn.Linear with the update accumulated into the base output by the GEMM itself.

PEFT's lora.Linear computes `result + lora_B(lora_A(x)) * scaling`: the rank-r product is written out at the full
output width, scaled in another pass and added in a third (and the scaling is a pass again in the backward). Here
the same modules (same parameters, names, adapters, PEFT's own code for everything else) compute
`result.addmm_(lora_A(x), lora_B.weight^T, alpha=scaling)`: the update lands in the base output in the GEMM's epilogue,
accumulated in fp32 and rounded once. For a 128-head attention projection over 16K tokens that is four passes over a
GB-sized tensor saved per forward and one per backward. PEFT's own forward still runs whenever the fast case does not
hold: adapters disabled or merged, several or no active adapters, a LoRA variant (DoRA), a LoRA bias, mixed-batch
`adapter_names`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _fast_case(m: nn.Module, kwargs: dict[str, Any]) -> str | None:
    """The one active plain-LoRA adapter of PEFT lora.Linear `m`, or None when PEFT's forward must run."""
    if m.disable_adapters or m.merged or kwargs:
        return None
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) != 1 or active[0] in m.lora_variant or m.lora_B[active[0]].bias is not None:
        return None
    return active[0]


def _forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    # x: [..., in] -> [..., out]
    name = _fast_case(self, kwargs) if not args else None
    if name is None:
        return type(self).__mro__[1].forward(self, x, *args, **kwargs)     # PEFT's lora.Linear.forward
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    result = self.base_layer(x)                                             # [M, out], not a view
    low = self.lora_A[name](self.lora_dropout[name](self._cast_input_dtype(x, self.lora_A[name].weight.dtype)))
    b = self.lora_B[name].weight                                            # [out, r]
    # in place on the base output itself (no view: autograd needs no copy of its gradient); nothing the backward
    # keeps reads it (F.linear saves its inputs)
    result.addmm_(low.to(result.dtype), b.t().to(result.dtype), alpha=self.scaling[name])
    return result.view(*shape[:-1], result.shape[-1])


_classes: dict[type, type] = {}


def _fast_class(cls: type) -> type:
    if cls not in _classes:
        _classes[cls] = type(f"Addmm{cls.__name__}", (cls,), {"forward": _forward, "__module__": __name__})
    return _classes[cls]


def install(model: nn.Module) -> int:
    """Give every PEFT lora.Linear in `model` the addmm forward (a subclass of its own class, so isinstance checks,
    saving and PEFT's other methods are unchanged). Returns how many modules got it."""
    from peft.tuners.lora.layer import Linear
    n = 0
    for mod in model.modules():
        if type(mod) is Linear:
            mod.__class__ = _fast_class(Linear)
            n += 1
    return n


def uninstall(model: nn.Module) -> int:
    """Back to PEFT's own forward (benchmarks compare the two)."""
    n = 0
    for mod in model.modules():
        for base, fast in _classes.items():
            if type(mod) is fast:
                mod.__class__ = base
                n += 1
    return n
