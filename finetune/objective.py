"""The training objective as a module (so DDP can wrap it): next-token cross-entropy on target tokens, plus the
MTP module's next-next-token cross-entropy.

Returns sums, not means: the train loop divides by the number of target tokens of the whole global batch (all
micro-batches, all workers), so every target token weighs the same however the batch is split. Only target
positions go through the main LM head (their hidden states are gathered first), which matters with a 129K
vocabulary; the MTP loss uses model.mtp_logits as is (it is meant for text data, where every token is a target).
Works on a plain raymoe model or a PeftModel around one (the LoRA layers sit inside the raymoe model).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """The raymoe DeepseekV3ForCausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def mixed_precision(model: nn.Module):
    """The forward's precision context: for a bf16 model, autocast to bf16, so the LoRA branches (whose factors
    PEFT keeps in fp32, casting the activations up to meet them) run their matmuls in bf16 against fp32 master
    weights; the MoE gates keep fp32 (Gate turns autocast off). fp32 models run as they are."""
    p = next(model.parameters())
    return torch.autocast(p.device.type, dtype=torch.bfloat16) if p.dtype == torch.bfloat16 else nullcontext()


def target_counts(mask: torch.Tensor) -> tuple[int, int]:
    # mask: [B, T] -> (main targets, MTP targets): positions 1.. and 2.. that are targets
    return int(mask[:, 1:].sum().item()), int(mask[:, 2:].sum().item())


class CausalLMObjective(nn.Module):
    def __init__(self, model: nn.Module, mtp_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.mtp_weight = mtp_weight

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ids: [B, T] long; mask: [B, T] (1 = target) -> (sum of main CE, sum of MTP CE) over target tokens
        m = base_model(self.model)
        with mixed_precision(m):
            return self._losses(m, ids, mask)

    def _losses(self, m: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = m.hidden_states(ids)                                            # [B, T, H]
        sel = mask[:, 1:].bool()
        logits = m.lm_head(h[:, :-1][sel])                                  # [N, V]
        main = F.cross_entropy(logits.float(), ids[:, 1:][sel], reduction="sum")
        mtp = h.new_zeros((), dtype=torch.float32)
        if self.mtp_weight > 0 and ids.shape[1] > 2:
            sel2 = mask[:, 2:].bool()
            mtp_logits = m.mtp_logits(h[:, :-2], ids[:, 1:-1])[sel2]          # [M, V] predicts ids[:, 2:]
            mtp = F.cross_entropy(mtp_logits.float(), ids[:, 2:][sel2], reduction="sum")
        return main, mtp
