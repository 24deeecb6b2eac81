"""Weight-only FP8 GEMMs equal the dequantised weights' product: x @ (w8 * scale_inv)^T in fp32 from the same bf16
activations, within bf16 rounding of the output; edge blocks (N, K not multiples of 128), split K, grouped experts
with empty experts."""
from __future__ import annotations

import pytest
import torch

from raymoe.platform.checkpoint.fp8 import dequantize_blockwise, quantize_blockwise
from kernel_helpers import DEV, needs_kernels


def _weight(N: int, K: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = torch.randn(N, K, generator=g) / K ** 0.5
    w[: min(N, 128), : min(K, 128)] *= 8                  # blocks of different scales
    w8, s = quantize_blockwise(w)
    return w8.to(DEV), s.to(DEV), dequantize_blockwise(w8, s, torch.float32).to(DEV)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


@needs_kernels
@pytest.mark.parametrize("M,N,K", [(1, 256, 384), (5, 200, 300), (32, 384, 256)])
@pytest.mark.parametrize("split_k", [None, 1, 2, 3])
def test_fp8_linear_equals_dequantised(M, N, K, split_k):
    from raymoe.platform.kernels.fp8_gemm import fp8_linear
    g = torch.Generator().manual_seed(M * 7 + N)
    w8, s, w = _weight(N, K, g)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16).to(DEV)
    y = fp8_linear(x, w8, s, split_k=split_k)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    assert _rel(y, x.float() @ w.T) < 1e-2


@needs_kernels
@pytest.mark.parametrize("split_k", [None, 1, 3])
@pytest.mark.parametrize("counts", [[3, 0, 20, 1, 0, 5],             # empty experts, one longer than a row tile
                                    [0, 0, 0, 0, 2, 0, 0, 1, 0, 0]])  # fewer rows than experts: busy ones late
def test_fp8_grouped_equals_per_expert(split_k, counts):
    from raymoe.platform.kernels.fp8_gemm import Tiles, fp8_grouped
    g = torch.Generator().manual_seed(3)
    E, N, K = len(counts), 192, 320
    parts = [_weight(N, K, g) for _ in range(E)]
    w8 = torch.stack([p[0] for p in parts])
    s = torch.stack([p[1] for p in parts])
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEV)
    x = torch.randn(sum(counts), K, generator=g).to(torch.bfloat16).to(DEV)
    y = fp8_grouped(x, w8, s, offs, None if split_k is None else Tiles(64, split_k, 4, 3))
    ref = torch.cat([x[o - c:o].float() @ parts[e][2].T for e, (c, o) in enumerate(zip(counts, offs.tolist()))])
    assert _rel(y, ref) < 1e-2


@needs_kernels
def test_fp8_rejects_bad_shapes():
    from raymoe.platform.kernels.fp8_gemm import fp8_grouped, fp8_linear
    w8 = torch.zeros(128, 256, device=DEV).to(torch.float8_e4m3fn)
    s = torch.ones(1, 2, device=DEV)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(torch.zeros(2, 128, dtype=torch.bfloat16, device=DEV), w8, s)
    with pytest.raises(ValueError, match="scale_inv"):
        fp8_linear(torch.zeros(2, 256, dtype=torch.bfloat16, device=DEV), w8, torch.ones(2, 2, device=DEV))
    with pytest.raises(ValueError, match="offs"):
        fp8_grouped(torch.zeros(2, 256, dtype=torch.bfloat16, device=DEV), w8[None], s[None],
                    torch.zeros(2, dtype=torch.int32, device=DEV))
