"""Routed-expert LoRA applied factored (finetune.expert_lora + RoutedExperts) equals PEFT's own merging path:
outputs and the gradients of lora_A, lora_B and the input, for gate_up_proj, down_proj or both, with routing that
leaves experts without rows, at a rank the grouped GEMM takes as is and one it pads; and the per-expert loop
(the fallback without a grouped GEMM) agrees too."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from raymoe.finetune.config import LoraConfigSpec
from raymoe.finetune.expert_lora import LoraExpertDispatch, factors, install
from raymoe.finetune.lora import apply_lora, plan_lora
from raymoe.platform.config import ModelConfig
from raymoe.platform.model import RoutedExperts, from_pretrained
from raymoe.platform.model.moe import ExpertLora

from ft_helpers import assert_adapter_toggles, randomize_lora

WEIGHTS = {"gate_up": ["gate_up_proj"], "down": ["down_proj"], "both": ["gate_up_proj", "down_proj"]}


def _routing(n: int, k: int, experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k over a subset of the experts (a third of them get no row)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, experts, generator=g)
    scores[:, torch.randperm(experts, generator=g)[: experts // 3]] = -1
    ids = scores.topk(k, dim=1)[1]
    return ids, torch.rand(n, k, generator=g) + 0.5


def _model_with_lora(tiny32, weights: list[str], rank: int):
    model = from_pretrained(tiny32, dtype=torch.float32)
    targets = [f"model.layers.1.mlp.experts.{w}" for w in weights]
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank + 1, target_modules=[],
                                          target_parameters=targets))
    randomize_lora(pm, std=0.3)
    assert install(pm) == 1
    return pm, pm.get_base_model().model.layers[1].mlp


def _run(fn, moe, x, ids, w):
    """Output and the gradients of the input, the routing weights and every trainable parameter of the layer, for
    a random output gradient."""
    params = {n: p for n, p in moe.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fn(xi, ids, wi)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)))
    return {"out": out.detach(), "x": xi.grad, "w": wi.grad, **{n: p.grad.clone() for n, p in params.items()}}


def _assert_close(got: dict, ref: dict, tol: float = 2e-6) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        err = ((got[name] - ref[name]).abs().max() / ref[name].abs().max()).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


def _random_lora(shape: torch.Size, rank: int, g: torch.Generator):
    E, out_f, in_f = shape
    return ExpertLora(torch.randn(E, rank, in_f, generator=g) * 0.3, torch.randn(E, out_f, rank, generator=g) * 0.3,
                      1.5)


@pytest.mark.parametrize("rank", [4, 3])
@pytest.mark.parametrize("which", list(WEIGHTS))
def test_factored_expert_lora_equals_peft_merge(tiny32, which, rank):
    pm, moe = _model_with_lora(tiny32, WEIGHTS[which], rank)
    assert sorted(wr.parameter_name for wr in moe.dispatch.wrappers) == sorted(WEIGHTS[which])
    x = torch.randn(41, pm.get_base_model().config.hidden_size, generator=torch.Generator().manual_seed(1))
    ids, w = _routing(41, 4, 16, seed=2)
    assert torch.bincount(ids.flatten(), minlength=16).eq(0).sum() >= 5
    ref = _run(moe.dispatch.peft, moe, x, ids, w)                      # PEFT: W + s B A for the whole stack
    ours = _run(lambda *a: moe.dispatch(1, *a), moe, x, ids, w)        # factored, grouped GEMM (CPU kernel)
    _assert_close(ours, ref)
    experts: RoutedExperts = moe.dispatch.experts
    lora = {wr.parameter_name: factors(wr) for wr in moe.dispatch.wrappers}
    loop = _run(lambda *a: experts._loop(*a, lora=lora), moe, x, ids, w)  # fallback without a grouped GEMM
    _assert_close(loop, ref)
    with torch.no_grad():                                              # inference with the adapter: same path
        _assert_close({"out": moe.dispatch(1, x, ids, w)}, {"out": ref["out"]})


def test_grouped_training_path_equals_loop_without_lora(tiny32):
    """Full finetuning (no LoRA): the grouped path's gradients of the input, the routing weights and both expert
    stacks equal the per-expert loop's."""
    moe = from_pretrained(tiny32, dtype=torch.float32).model.layers[2].mlp
    moe.requires_grad_(True)
    x = torch.randn(53, 64, generator=torch.Generator().manual_seed(5))
    ids, w = _routing(53, 4, 16, seed=6)
    grouped = _run(moe.experts._grouped, moe.experts, x, ids, w)
    _assert_close(grouped, _run(moe.experts._loop, moe.experts, x, ids, w))
    assert grouped.keys() == {"out", "x", "w", "gate_up_proj", "down_proj"}


def test_shard_gradients_ignore_rows_held_elsewhere(tiny32):
    """An expert-parallel shard under autograd: rows of experts it does not hold contribute nothing (the grouped
    GEMM leaves their rows undefined) to the output or the input gradient."""
    full = from_pretrained(tiny32, dtype=torch.float32).model.layers[1].mlp.experts
    part = RoutedExperts(ModelConfig.from_pretrained(tiny32), 4, 8)
    with torch.no_grad():
        part.gate_up_proj.copy_(full.gate_up_proj[4:12])
        part.down_proj.copy_(full.down_proj[4:12])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(29, part.gate_up_proj.shape[2], generator=g)
    ids, w = _routing(29, 4, 16, seed=4)
    lora = {"down_proj": _random_lora(part.down_proj.shape, 4, g)}
    grads = []
    for fn in (part._grouped, part._loop):
        xi = x.clone().requires_grad_(True)
        out = fn(xi, ids, w, lora)
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), xi.grad))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-5


def test_apply_lora_installs_dispatch_and_disabling_falls_back(tiny32):
    spec = LoraConfigSpec(rank=4, alpha=8, targets=["routed_experts"])
    model = from_pretrained(tiny32, dtype=torch.float32)
    pm = apply_lora(model, spec, plan_lora(model, spec), seed=0)
    moes = pm.get_base_model().moe_layers()
    assert [type(m.dispatch) for m in moes[:3]] == [LoraExpertDispatch] * 3
    assert all(m.dispatch is None for m in moes[3:])                   # MTP: no LoRA
    randomize_lora(pm)
    ids = torch.randint(5, 700, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_adapter_toggles(pm, tiny32, ids)
