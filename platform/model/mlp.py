"""The SwiGLU feed-forward used by the dense layers and the shared experts: down(silu(gate x) * up x)."""
from __future__ import annotations

import torch
from torch import nn

from raymoe.platform.model import fused


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, hidden] -> [N, hidden]
        return self.down_proj(fused.silu_mul(self.gate_proj(x), self.up_proj(x)))
