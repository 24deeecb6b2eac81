"""RMSNorm as DeepSeek-V3 uses it: statistics in fp32, the weight applied in the input dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.platform.model import fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        if x.dtype == torch.float32:      # same math, one fused kernel
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return fused.rms_norm(x, self.weight, self.eps)      # one kernel each way when training on a GPU
