"""Which weights carry LoRA for each target set, on raymoe and after PEFT loads the adapter on transformers' model,
and that both (and raymoe's own merge, which serving uses) compute the same logits."""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from raymoe.finetune.balance import routing_gate
from raymoe.finetune.config import LoraConfigSpec
from raymoe.finetune.lora import LoraTargetError, apply_lora, lora_carriers, plan_lora, save_adapter
from raymoe.platform.checkpoint.adapter import apply_adapter, read_adapter, unmerge_adapter, merge_adapter
from raymoe.platform.model import from_pretrained

from ft_helpers import randomize_lora

# The tiny preset: layer 0 dense, layers 1-3 MoE (16 experts), q_lora_rank set (q_a_proj / q_b_proj).
ATTN = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
GROUPS = {
    "attention": {f"model.layers.{L}.self_attn.{p}.weight" for L in range(4) for p in ATTN},
    "dense_mlp": {f"model.layers.0.mlp.{p}.weight" for p in MLP},
    "shared_experts": {f"model.layers.{L}.mlp.shared_experts.{p}.weight" for L in (1, 2, 3) for p in MLP},
    "routed_experts": {f"model.layers.{L}.mlp.experts.{w}" for L in (1, 2, 3) for w in ("gate_up_proj", "down_proj")},
}
TARGET_SETS = {
    "attention": (["attention"], GROUPS["attention"]),
    "two_projections": (["q_a_proj", "o_proj"], {f"model.layers.{L}.self_attn.{p}.weight" for L in range(4)
                                                 for p in ("q_a_proj", "o_proj")}),
    "dense_mlp": (["dense_mlp"], GROUPS["dense_mlp"]),
    "shared_experts": (["shared_experts"], GROUPS["shared_experts"]),
    "routed_experts": (["routed_experts"], GROUPS["routed_experts"]),
    "all": (["all"], set().union(*GROUPS.values())),
}


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(n: int = 2, t: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 700, (n, t), generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return ((a - b).abs().max() / b.abs().max()).item() < tol


@pytest.mark.parametrize("case", list(TARGET_SETS))
def test_lora_lands_where_asked_and_transformers_agrees(tiny32, tmp_path, case):
    targets, expected = TARGET_SETS[case]
    spec = LoraConfigSpec(rank=4, alpha=8, targets=targets)
    model = from_pretrained(tiny32, dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        base_logits = model(ids)
    plan = plan_lora(model, spec)
    assert plan.carriers == expected
    pm = apply_lora(model, spec, plan, seed=0)
    assert lora_carriers(pm) == expected
    assert not any("mtp" in n for n, p in pm.named_parameters() if p.requires_grad)
    randomize_lora(pm)
    with torch.no_grad():
        ours = pm.get_base_model()(ids)
    assert (ours - base_logits).abs().max() > 1e-2                      # the adapter does something
    save_adapter(pm, tmp_path / "adapter", str(tiny32))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not [m for m in saved["target_modules"] if m.rsplit(".", 1)[-1] in MLP]   # nothing PEFT would rewrite
    assert {f"{m}.weight" for m in saved["target_modules"]} | set(saved["target_parameters"] or []) == expected

    hf = PeftModel.from_pretrained(_hf(tiny32), str(tmp_path / "adapter"))
    assert lora_carriers(hf) == expected                                 # nothing rewritten, nothing dropped
    with torch.no_grad():
        assert _close(hf(ids).logits, ours)

    merged = from_pretrained(tiny32, dtype=torch.float32)                # raymoe's own merge (serving's path)
    apply_adapter(merged, tmp_path / "adapter")
    with torch.no_grad():
        assert _close(merged(ids), ours)


def test_peft_rewrites_mlp_target_modules_on_transformers(tiny32):
    """The trap the targets avoid: on transformers' DeepSeek-V3, PEFT 0.21 turns `target_modules` gate_proj /
    up_proj / down_proj into the fused routed-expert parameters; the dense MLP and shared experts get nothing."""
    pm = get_peft_model(_hf(tiny32), LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    assert lora_carriers(pm) == GROUPS["routed_experts"]


def test_gate_bias_travels_in_the_adapter(tiny32, tmp_path):
    """update_expert_bias in LoRA mode: the gates ride along as modules_to_save; weights frozen, bias carried."""
    spec = LoraConfigSpec(rank=4, alpha=8, targets=["attention"])
    model = from_pretrained(tiny32, dtype=torch.float32)
    plan = plan_lora(model, spec, train_gates=True)
    assert plan.gates == [f"model.layers.{L}.mlp.gate" for L in (1, 2, 3)]
    pm = apply_lora(model, spec, plan, seed=0)
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "modules_to_save" in n)
    randomize_lora(pm)
    with torch.no_grad():
        for moe in pm.get_base_model().moe_layers()[:3]:
            routing_gate(moe).e_score_correction_bias.add_(torch.linspace(-0.5, 0.5, 16))
    ids = _ids(t=16)
    with torch.no_grad():
        ours = pm.get_base_model()(ids)
    save_adapter(pm, tmp_path / "adapter", str(tiny32))
    hf = PeftModel.from_pretrained(_hf(tiny32), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert _close(hf(ids).logits, ours)
    plain = from_pretrained(tiny32, dtype=torch.float32)
    with torch.no_grad():
        base = plain(ids)
        adapter = read_adapter(tmp_path / "adapter")
        originals = merge_adapter(plain, adapter)
        assert _close(plain(ids), ours)
        unmerge_adapter(plain, adapter, originals)
        assert _close(plain(ids), base)


def test_expert_parallel_shard_merges_its_slice(tiny32, tmp_path):
    spec = LoraConfigSpec(rank=4, alpha=8, targets=["routed_experts"])
    pm = apply_lora(from_pretrained(tiny32, dtype=torch.float32), spec,
                    plan_lora(from_pretrained(tiny32, dtype=torch.float32), spec), seed=0)
    randomize_lora(pm)
    save_adapter(pm, tmp_path / "adapter")
    full = from_pretrained(tiny32, dtype=torch.float32)
    shard = from_pretrained(tiny32, dtype=torch.float32, experts_range=(4, 8))
    apply_adapter(full, tmp_path / "adapter")
    apply_adapter(shard, tmp_path / "adapter")
    for L in (1, 2, 3):
        for w in ("gate_up_proj", "down_proj"):
            got = getattr(shard.model.layers[L].mlp.experts, w)
            assert torch.equal(got, getattr(full.model.layers[L].mlp.experts, w)[4:8])


@pytest.mark.parametrize("spec, message", [
    (dict(targets=["mlp_everything"]), "lora.targets: unknown target 'mlp_everything'"),
    (dict(targets=["gate_proj"]), "'gate_proj' is ambiguous"),
    (dict(targets=["attention"], rank=33),
     "lora.rank 33 is larger than model.layers.0.self_attn.q_a_proj (out 32 x in 64); use at most 32"),
    (dict(targets=["routed_experts"], rank=40),
     "lora.rank 40 is larger than model.layers.1.mlp.experts.down_proj (per expert) (out 64 x in 32)"),
    (dict(targets=["dense_mlp"], dropout=0.1), "lora.dropout must be 0"),
])
def test_bad_targets_and_ranks(tiny32, spec, message):
    with torch.device("meta"):
        from raymoe.platform.config import ModelConfig
        from raymoe.platform.model import DeepseekV3ForCausalLM
        model = DeepseekV3ForCausalLM(ModelConfig.from_pretrained(tiny32))
    with pytest.raises(LoraTargetError) as e:
        plan_lora(model, LoraConfigSpec(**spec))
    assert message in str(e.value)
