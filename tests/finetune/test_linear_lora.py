"""Module LoRA with the update accumulated by the GEMM (finetune.linear_lora) equals PEFT's own lora.Linear forward:
logits and the gradient of every LoRA factor, on a model with LoRA on every target group, in fp32 and in bf16 under
the objective's autocast; PEFT's forward still serves disabled adapters; saving is unchanged."""
from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLinear
from safetensors.torch import load_file

from raymoe.finetune import linear_lora
from raymoe.finetune.config import LoraConfigSpec
from raymoe.finetune.lora import apply_lora, plan_lora, save_adapter
from raymoe.finetune.objective import mixed_precision
from raymoe.platform.model import from_pretrained

from ft_helpers import assert_adapter_toggles, randomize_lora


def _lora_model(ckpt, dtype: torch.dtype):
    spec = LoraConfigSpec(rank=4, alpha=8, targets=["all"])
    model = from_pretrained(ckpt, dtype=dtype)
    pm = apply_lora(model, spec, plan_lora(model, spec), seed=0)
    randomize_lora(pm)
    return pm


def _logits_and_grads(pm, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pm.zero_grad(set_to_none=True)
    model = pm.get_base_model()
    with mixed_precision(model):
        logits = model(ids)
    logits.float().pow(2).mean().backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in pm.named_parameters() if p.grad is not None}


def test_every_module_lora_takes_the_addmm_forward(tiny32):
    pm = _lora_model(tiny32, torch.float32)
    linears = [m for m in pm.modules() if isinstance(m, PeftLinear)]
    assert linears and all(type(m).__name__ == "AddmmLinear" for m in linears)
    # attention projections, dense MLP and shared experts of the main layers; MTP modules get none
    names = {n.split(".base_model.model.")[-1] for n, m in pm.named_modules() if isinstance(m, PeftLinear)}
    assert any("self_attn.kv_b_proj" in n for n in names) and any("mlp.shared_experts.down_proj" in n for n in names)
    assert any(".0.mlp.gate_proj" in n for n in names) and not any(".mtp." in n for n in names)


def test_addmm_forward_equals_peft(tiny32):
    """fp32, the whole model: logits and every LoRA factor's gradient."""
    tol = 2e-6
    pm = _lora_model(tiny32, torch.float32)
    ids = torch.randint(5, 700, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = _logits_and_grads(pm, ids)
    assert linear_lora.uninstall(pm) > 0
    peft = _logits_and_grads(pm, ids)
    assert ((ours[0] - peft[0]).abs().max() / peft[0].abs().max()).item() < tol
    assert ours[1].keys() == peft[1].keys() and any("kv_b_proj.lora_B" in n for n in ours[1])
    for name, g in peft[1].items():
        err = ((ours[1][name] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


def _module_run(mod, x: torch.Tensor) -> list[torch.Tensor]:
    xi = x.clone().requires_grad_(True)
    for p in mod.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(xi)
    out.float().backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)))
    return [out.detach().float(), xi.grad.float()] + [p.grad.float() for n, p in mod.named_parameters()
                                                       if "lora_" in n]


@pytest.mark.parametrize("proj", ["self_attn.kv_b_proj", "self_attn.q_a_proj", "mlp.down_proj"])
def test_addmm_forward_equals_peft_bf16_autocast(tiny32, proj):
    """A bf16 model under the objective's autocast, one module at a time (through the whole model, bf16 rounding
    flips near-tied choices of the random gates and the comparison would say nothing): output and the gradients of
    the input and both factors. Ours rounds once (the GEMM accumulates the update in fp32), PEFT's twice."""
    pm = _lora_model(tiny32, torch.bfloat16)
    mod = pm.get_base_model().model.layers[0].get_submodule(proj)
    x = torch.randn(3, 5, mod.in_features, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ours = _module_run(mod, x)
    linear_lora.uninstall(pm)
    for a, b in zip(ours, _module_run(mod, x), strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


def test_disabled_adapter_and_saving(tiny32, tmp_path):
    pm = _lora_model(tiny32, torch.float32)
    ids = torch.randint(5, 700, (1, 7), generator=torch.Generator().manual_seed(1))
    assert_adapter_toggles(pm, tiny32, ids)
    save_adapter(pm, tmp_path / "a")
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    linear_lora.uninstall(pm)
    save_adapter(pm, tmp_path / "b")
    assert keys == set(load_file(str(tmp_path / "b" / "adapter_model.safetensors")))
