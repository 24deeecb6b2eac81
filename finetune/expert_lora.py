"""Routed-expert LoRA without merging: PEFT holds the adapter, `RoutedExperts` applies it per expert, factored.

PEFT 0.21 applies LoRA to a stacked expert parameter (`target_parameters`, its ParamWrapper) by parametrising it as
W + s * B @ A for the whole stack on every forward and differentiating through that: for DeepSeek-V3's 256 experts
that is a copy of the layer's expert weights per forward, and their full gradient per backward. Here the PEFT
modules stay exactly as get_peft_model made them (the same parameters, names and layout, so saving, loading, and
transformers + PEFT reading the file see nothing different); each such MoE layer gets a `dispatch` that reads the
wrappers' factors and hands them to `RoutedExperts`, which adds s * (x A_e^T) B_e^T to expert e's rows itself.
PEFT's own (merging) forward still runs when the adapters are disabled or merged, or several are active.

PEFT's layout for a 3-D parameter is decoded in one place, `checkpoint.adapter.expert_factors`. Never changes a
parameter.
"""
from __future__ import annotations

import torch
from torch import nn

from raymoe.platform.checkpoint.adapter import expert_factors
from raymoe.platform.model.moe import ExpertDispatch, ExpertLora, LocalDispatch, MoE, RoutedExperts


def factors(wrapper: nn.Module) -> ExpertLora | None:
    """The one active adapter of a PEFT ParamWrapper on a stacked expert weight as `ExpertLora` (views: autograd
    reaches lora_A / lora_B), or None when PEFT must apply it itself (disabled, merged, several adapters)."""
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if wrapper.disable_adapters or wrapper.merged or len(active) != 1:
        return None
    A, B = wrapper.lora_A[active[0]].weight, wrapper.lora_B[active[0]].weight       # [E*r, in], [out, r*E]
    a, b = expert_factors(A, B, wrapper.num_experts)                                 # [E, r, in], [E, out, r]
    return ExpertLora(a, b, wrapper.scaling[active[0]])


class LoraExpertDispatch(ExpertDispatch):
    """MoE.dispatch of one layer whose routed experts carry PEFT LoRA (a chain of ParamWrappers, one per weight).
    It wraps the layer's dispatch as every wrapper does (`inner`: the one installed before, else the local
    experts) and hands the factors down with the rows; a transport that cannot carry them says so."""

    def __init__(self, moe: MoE) -> None:
        from peft.tuners.lora.layer import ParamWrapper
        self.peft = moe.experts                          # the outermost wrapper: PEFT's own merging forward
        self.wrappers: list[nn.Module] = []
        mod = moe.experts
        while isinstance(mod, ParamWrapper):
            self.wrappers.append(mod)
            mod = mod.base_layer
        if not isinstance(mod, RoutedExperts) or not self.wrappers:
            raise TypeError(f"layer {moe.layer}: experts are {type(mod).__name__}, not PEFT-wrapped RoutedExperts")
        self.experts: RoutedExperts = mod
        self.inner: ExpertDispatch = moe.dispatch or LocalDispatch(mod)
        self.remote = self.inner.remote

    def send(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, lora=None):
        # x: [N, H]; topk_ids/topk_w: [N, k] -> pending [N, H]
        factors_ = dict(lora or {})
        for w in self.wrappers:
            f = factors(w)
            if f is None:
                if self.inner.remote:
                    raise ValueError(f"layer {layer}: PEFT's merging forward (disabled, merged or several "
                                     f"adapters) needs the layer's experts in this process")
                return ("peft", self.peft(x, topk_ids, topk_w))
            factors_[w.parameter_name] = f
        return ("inner", self.inner.send(layer, x, topk_ids, topk_w, lora=factors_))

    def wait(self, pending):
        kind, p = pending
        return p if kind == "peft" else self.inner.wait(p)


def install(model: nn.Module) -> int:
    """Give every MoE layer of `model` (a PeftModel or its base) whose experts PEFT wrapped a
    `LoraExpertDispatch`. Returns how many layers got one."""
    from peft.tuners.lora.layer import ParamWrapper
    n = 0
    for mod in model.modules():
        if isinstance(mod, MoE) and isinstance(mod.experts, ParamWrapper):
            if not isinstance(mod.dispatch, LoraExpertDispatch):
                mod.dispatch = LoraExpertDispatch(mod)
            n += 1
    return n
