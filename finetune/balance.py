"""Expert load during training: tokens per routed expert per MoE layer, the imbalance metric, and DeepSeek-V3's
auxiliary-loss-free balancing (after each step, b_i += rate * sign(mean_load - load_i) on every gate's
e_score_correction_bias, which only steers selection).

Loads are summed over the step's micro-batches and all-reduced over workers (by the train loop) before use, so
every worker applies the same bias update and the replicas stay identical. Under PEFT the gate may be wrapped as
`modules_to_save`; the bias that routes is then the wrapped copy's, the one updated (and saved with the adapter).
"""
from __future__ import annotations

import torch

from raymoe.platform.model.moe import Gate, MoE


def routing_gate(moe: MoE) -> Gate:
    """The Gate that routes `moe` (the active modules_to_save copy when PEFT wraps it)."""
    g = moe.gate
    if isinstance(g, Gate):
        return g
    return g.modules_to_save[g.active_adapters[0]] if hasattr(g, "modules_to_save") else g.original_module


class ExpertLoad:
    def __init__(self, moe_layers: list[MoE]) -> None:
        self.layers = moe_layers
        n_experts = routing_gate(moe_layers[0]).n_experts if moe_layers else 0
        self.counts = torch.zeros(len(moe_layers), n_experts, dtype=torch.float64)
        for m in moe_layers:
            m.count_load()

    def collect(self) -> None:
        """Add the routing of the forward pass that just ran (call after each micro-batch forward)."""
        for i, m in enumerate(self.layers):
            self.counts[i] += m.expert_load.double().cpu()
            m.expert_load.zero_()

    def finish_step(self, counts: torch.Tensor, update_bias: bool, rate: float) -> float:
        """Use this step's loads `counts` [layers, experts] (summed over all workers by the caller, in one
        all-reduce with the other step statistics): optionally move the biases, reset. Returns the mean over
        MoE layers of max load / mean load (1.0 = perfectly balanced)."""
        seen = counts.sum(1) > 0
        imbalance = float((counts[seen].max(1).values / counts[seen].mean(1)).mean()) if bool(seen.any()) else 1.0
        if update_bias:
            with torch.no_grad():
                for i, m in enumerate(self.layers):
                    if seen[i]:
                        bias = routing_gate(m).e_score_correction_bias
                        step = rate * torch.sign(counts[i].mean() - counts[i])
                        bias.add_(step.to(bias.dtype).to(bias.device))
        self.counts.zero_()
        return imbalance
