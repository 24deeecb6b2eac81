"""LoRA on a raymoe DeepSeek-V3 model with PEFT: which weights get adapters, applying them, saving the adapter.

Targets are named by group or by attention projection:
  attention       q_a_proj, q_b_proj (or q_proj), kv_a_proj_with_mqa, kv_b_proj, o_proj of every layer
  dense_mlp       gate_proj, up_proj, down_proj of the dense layers (0 .. first_k_dense_replace - 1)
  shared_experts  gate_proj, up_proj, down_proj of every MoE layer's shared expert
  routed_experts  the stacked expert weights experts.gate_up_proj [E, 2I, H] and experts.down_proj [E, H, I]
  all             the four groups; or any single attention projection name (q_a_proj, o_proj, ...)
Every target is written as a full path, and MTP modules never get LoRA.

The PEFT 0.21 + transformers 5 trap: when an adapter is loaded on transformers' DeepseekV3ForCausalLM, PEFT
rewrites `target_modules` named gate_proj / up_proj / down_proj (bare, dotted or as a regex) to the fused
routed-expert parameters, so the dense MLP and the shared experts silently lose their LoRA. The bare names are
refused here, and the saved adapter names every MLP weight in `target_parameters` instead
(`model.layers.0.mlp.gate_proj.weight`, ...), which PEFT leaves alone and applies with its ParamWrapper
(W + s * B @ A). Training applies the same MLP LoRA as module LoRA (x A^T B^T s; no per-forward
parametrisation, which costs about 0.7 ms per wrapped weight on CPU): the math, the tensor keys
(`...mlp.gate_proj.lora_A.weight`) and the shapes are identical, so only the config's wording differs between
the model being trained (`train_config`) and the file (`saved_config`). Routed experts are target_parameters in
both; in training their LoRA runs factored inside the experts' grouped products (finetune.expert_lora), not as
PEFT's merge of the whole stack; module LoRA adds its update inside the rank-r GEMM (finetune.linear_lora).
Dropout is refused with MLP targets, since PEFT's ParamWrapper rejects a config
with dropout.
With `update_expert_bias`, the MoE gates travel in the adapter as `modules_to_save` (their bias changes; their
weight stays frozen), which PEFT also loads on transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from raymoe.finetune import expert_lora, linear_lora
from raymoe.finetune.config import LoraConfigSpec
from raymoe.platform.model.mlp import MLP
from raymoe.platform.model.moe import MoE

ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
GROUPS = ("attention", "dense_mlp", "shared_experts", "routed_experts")
_MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
_REFUSED = (*_MLP_PROJ, "gate_up_proj", "experts", "mlp", "gate")


class LoraTargetError(ValueError):
    """Targets or a rank that cannot be applied; the message names the key and the layer."""


@dataclass
class LoraPlan:
    attention: list[str] = field(default_factory=list)    # attention nn.Linear module paths
    mlp: list[str] = field(default_factory=list)          # dense / shared-expert nn.Linear module paths
    experts: list[str] = field(default_factory=list)      # stacked routed-expert parameter paths
    gates: list[str] = field(default_factory=list)        # gate module paths -> modules_to_save

    @property
    def carriers(self) -> set[str]:
        """The base parameters that carry LoRA (the same naming as `lora_carriers`)."""
        return {f"{m}.weight" for m in self.attention + self.mlp} | set(self.experts)


def _selected(targets: list[str]) -> tuple[set[str], set[str]]:
    """(groups, attention projection names) asked for; LoraTargetError for anything else."""
    groups, projs = set(), set()
    for t in targets:
        if t == "all":
            groups.update(GROUPS)
        elif t in GROUPS:
            groups.add(t)
        elif t in ATTENTION:
            projs.add(t)
        elif t in _REFUSED:
            raise LoraTargetError(
                f"lora.targets: {t!r} is ambiguous; use dense_mlp, shared_experts or routed_experts (PEFT 0.21 on "
                f"transformers 5 rewrites bare gate_proj/up_proj/down_proj targets to the routed experts)")
        else:
            raise LoraTargetError(f"lora.targets: unknown target {t!r} (known: all, {', '.join(GROUPS)}, "
                                  f"{', '.join(ATTENTION)})")
    if "attention" in groups:
        projs.update(ATTENTION)
    return groups, projs


def _check_rank(rank: int, name: str, out_features: int, in_features: int) -> None:
    if rank > min(out_features, in_features):
        raise LoraTargetError(f"lora.rank {rank} is larger than {name} (out {out_features} x in {in_features}); "
                              f"use at most {min(out_features, in_features)}")


def plan_lora(model: nn.Module, spec: LoraConfigSpec, train_gates: bool = False) -> LoraPlan:
    """Resolve `spec.targets` on a raymoe model (real or on the meta device) and check the rank against every
    targeted weight. Only the main decoder layers (`model.layers.*`) are considered."""
    groups, projs = _selected(spec.targets)
    plan = LoraPlan()
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        for proj in ATTENTION:
            lin = getattr(layer.self_attn, proj, None)
            if proj in projs and isinstance(lin, nn.Linear):
                _check_rank(spec.rank, f"{prefix}.self_attn.{proj}", lin.out_features, lin.in_features)
                plan.attention.append(f"{prefix}.self_attn.{proj}")
        mlp = layer.mlp
        mlps: list[tuple[str, MLP]] = []
        if isinstance(mlp, MLP) and "dense_mlp" in groups:
            mlps.append((f"{prefix}.mlp", mlp))
        if isinstance(mlp, MoE) and mlp.shared_experts is not None and "shared_experts" in groups:
            mlps.append((f"{prefix}.mlp.shared_experts", mlp.shared_experts))
        for path, m in mlps:
            for proj in _MLP_PROJ:
                lin = getattr(m, proj)
                _check_rank(spec.rank, f"{path}.{proj}", lin.out_features, lin.in_features)
                plan.mlp.append(f"{path}.{proj}")
        if isinstance(mlp, MoE):
            if "routed_experts" in groups:
                for which in ("gate_up_proj", "down_proj"):
                    _, out_f, in_f = getattr(mlp.experts, which).shape
                    _check_rank(spec.rank, f"{prefix}.mlp.experts.{which} (per expert)", out_f, in_f)
                    plan.experts.append(f"{prefix}.mlp.experts.{which}")
            if train_gates:
                plan.gates.append(f"{prefix}.mlp.gate")
    if not plan.carriers:
        raise LoraTargetError(f"lora.targets {spec.targets} match no weight of this model")
    if (plan.mlp or plan.experts) and spec.dropout > 0:
        raise LoraTargetError("lora.dropout must be 0 when targeting dense_mlp, shared_experts or routed_experts "
                              "(PEFT's target_parameters LoRA has no dropout)")
    return plan


def train_config(plan: LoraPlan, spec: LoraConfigSpec):
    """What raymoe trains with: module LoRA on every nn.Linear, parameter LoRA on the stacked experts."""
    from peft import LoraConfig
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                      target_modules=plan.attention + plan.mlp, target_parameters=plan.experts or None,
                      modules_to_save=plan.gates or None)


def saved_config(config):
    """What the adapter file says: `config` with the MLP projections moved from target_modules to
    target_parameters (see the module docstring), typed CAUSAL_LM, for inference."""
    import copy
    out = copy.deepcopy(config)
    modules = sorted(config.target_modules or [])
    mlp = [m for m in modules if m.rsplit(".", 1)[-1] in _MLP_PROJ]
    out.target_modules = [m for m in modules if m not in mlp]
    out.target_parameters = [f"{m}.weight" for m in mlp] + list(config.target_parameters or [])
    out.task_type, out.inference_mode = "CAUSAL_LM", True
    return out


def apply_lora(model: nn.Module, spec: LoraConfigSpec, plan: LoraPlan, seed: int):
    """Wrap `model` with PEFT LoRA per `plan` (LoRA A initialised from `seed`). Returns the PeftModel.
    (A PeftModel, not PeftModelForCausalLM: that one wants transformers' generate(), which raymoe lacks.)"""
    from peft import get_peft_model
    torch.manual_seed(seed)
    pm = get_peft_model(model, train_config(plan, spec))
    expert_lora.install(pm)
    linear_lora.install(pm)
    # A bf16 model trains under autocast (objective.mixed_precision), which runs the LoRA matmuls in bf16 against
    # the fp32 factors; PEFT's own cast of every LoRA input up to fp32 would only add two full copies of it.
    from peft.tuners.tuners_utils import BaseTunerLayer
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    for m in pm.modules():
        if isinstance(m, BaseTunerLayer):
            m.cast_input_dtype_enabled = not bf16
    for name, p in pm.named_parameters():
        if ".modules_to_save." in name:                   # gates: the bias moves by rule, the weight stays
            p.requires_grad_(False)
    return pm


def lora_carriers(model: nn.Module) -> set[str]:
    """Base parameter paths that carry a LoRA adapter in a PEFT-wrapped model (raymoe or transformers)."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper
    out = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer) or not len(mod.lora_A):
            continue
        path = name.removeprefix("base_model.model.").replace(".base_layer", "")
        out.add(f"{path}.{mod.parameter_name}" if isinstance(mod, ParamWrapper) else f"{path}.weight")
    return out


def save_adapter(pm, out_dir: str | Path, base_model: str | None = None, state_dict: dict | None = None) -> Path:
    """Write the adapter as PEFT does (adapter_config.json + adapter_model.safetensors, PEFT's own keys), with
    `saved_config` as its config.

    PeftModel.save_pretrained cannot be used on a raymoe model: it builds a model card from `model.config`, which
    it expects to be a transformers config. The two files are what it would write.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(pm, state_dict=state_dict)     # state_dict: gathered from FSDP2 shards
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = saved_config(pm.peft_config["default"])
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out))
    return out


def load_adapter_weights(pm, adapter_dir: str | Path) -> None:
    """Load adapter_model.safetensors into a PeftModel built with the same plan (exact, for resuming)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(pm, state)
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{adapter_dir}: adapter does not match the model (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]})")
