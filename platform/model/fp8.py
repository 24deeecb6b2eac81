"""FP8 weights kept in FP8: the release's block format, and the linear layer that holds a weight in it.

A float8_e4m3fn weight W8 [out, in] comes with `weight_scale_inv` S [ceil(out/B), ceil(in/B)] fp32 (B = 128) and
means W[i, j] = W8[i, j] * S[i // B, j // B]; edge blocks are partial. `dequantize_blockwise` / `quantize_blockwise`
convert tensors (the checkpoint loader and writer use them too). `Fp8Linear` holds W8 and S as they are stored and
computes x W^T with the weight-only Triton GEMM (`kernels.fp8_gemm.fp8_linear`) where `kernels.enabled(x)`, else by
dequantising per call in PyTorch: slow, but the reference the kernel is checked against and the CPU path.
`keep_dtypes` makes a module's `.to(dtype)` leave its own tensors in their dtypes (FP8 weights, fp32 scales).
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.platform import kernels

FP8_MAX = 448.0
BLOCK = 128          # the release's quantisation block, both dimensions (the kernels assume it)
FP8_DTYPE = torch.float8_e4m3fn


def dequantize_blockwise(w8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                         block: tuple[int, int] = (BLOCK, BLOCK)) -> torch.Tensor:
    # w8: [out, in] float8_e4m3fn; scale_inv: [ceil(out/bo), ceil(in/bi)] fp32 -> [out, in] dtype
    out, inp = w8.shape
    bo, bi = block
    expected = (-(-out // bo), -(-inp // bi))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"[{out}, {inp}] weight with {bo}x{bi} blocks")
    s = scale_inv.float().repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
    return (w8.float() * s).to(dtype)


def dequantize_stack(w8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # w8: [E, out, in] e4m3; scale_inv: [E, ceil(out/128), ceil(in/128)] -> [E, out, in] dtype
    E, out, inp = w8.shape
    s = scale_inv.float().repeat_interleave(BLOCK, 1)[:, :out].repeat_interleave(BLOCK, 2)[:, :, :inp]
    return (w8.float() * s).to(dtype)


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    # w: [out, in] -> (float8_e4m3fn [out, in], scale_inv fp32 [ceil(out/bo), ceil(in/bi)]), on w's device
    out, inp = w.shape
    bo, bi = block
    nbo, nbi = -(-out // bo), -(-inp // bi)
    padded = torch.zeros(nbo * bo, nbi * bi, dtype=torch.float32, device=w.device)
    padded[:out, :inp] = w.float()
    blocks = padded.view(nbo, bo, nbi, bi)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(nbo * bo, nbi * bi)[:out, :inp].to(FP8_DTYPE)
    return q.contiguous(), scale_inv.contiguous()


def scale_shape(out: int, inp: int) -> tuple[int, int]:
    """weight_scale_inv's shape for an [out, in] weight."""
    return -(-out // BLOCK), -(-inp // BLOCK)


def frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


Apply = Callable[[torch.Tensor], torch.Tensor]


def keep_dtypes(module: nn.Module, fn: Apply) -> Apply:
    """`fn` (what nn.Module._apply maps over a module's tensors) changed so that `module`'s own parameters and
    buffers follow device moves and re-allocation (`to_empty`) but never a dtype change (`.to(bf16)`): probed on an
    empty tensor, a dtype-changing fn is replaced by a plain move for them. Child modules get `fn` unchanged."""
    kept = {id(t) for t in module.parameters(recurse=False)} | {id(t) for t in module.buffers(recurse=False)}

    def apply(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in kept:
            return fn(t)
        probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        return fn(t) if probe.dtype == t.dtype else t.to(probe.device)
    return apply


class Fp8Linear(nn.Module):
    """A bias-free linear layer whose weight stays FP8: `weight` e4m3 [out, in] and `weight_scale_inv` fp32
    [ceil(out/128), ceil(in/128)], the checkpoint's own tensors under the checkpoint's own names. Both are frozen
    parameters (inference only). `.to(dtype)` leaves them as they are; activations keep their dtype."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = frozen(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.weight_scale_inv = frozen(torch.empty(*scale_shape(out_features, in_features), dtype=torch.float32,
                                                   device=device))
        self.bias = None

    @classmethod
    def like(cls, linear: nn.Linear) -> Fp8Linear:
        """An (uninitialised) FP8 layer of `linear`'s shape on its device."""
        if linear.bias is not None:
            raise ValueError("FP8 linear layers have no bias (the release's have none)")
        return cls(linear.in_features, linear.out_features, linear.weight.device)

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_dtypes(self, fn), recurse)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight dequantised: [out, in] in `dtype`."""
        return dequantize_blockwise(self.weight, self.weight_scale_inv, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in] -> [N, out] in x's dtype
        if kernels.enabled(x) and x.dtype in (torch.bfloat16, torch.float16):
            from raymoe.platform.kernels.fp8_gemm import fp8_linear
            shape = x.shape
            return fp8_linear(x.reshape(-1, shape[-1]), self.weight, self.weight_scale_inv).view(*shape[:-1], -1)
        return F.linear(x, self.dense(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 128x128 blocks"


# ---- a whole model in FP8 ------------------------------------------------------------------------------------------
# Linear layers of a decoder block that stay dense under FP8: absorbed MLA splits kv_b_proj's matrix per head into
# the query and output (mla.py), so it is dequantised at load, as DeepSeek's own inference code does with wkv_b.
KEEP_DENSE = ("kv_b_proj",)
_BLOCK_MODULE = re.compile(r"^(model\.layers\.\d+|mtp\.\d+\.block)\.")


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Module names of the linear layers a model in FP8 computes from FP8 weights: every nn.Linear of a decoder
    block (main or MTP), which the release stores in FP8, but KEEP_DENSE. Not the embeddings, the head, the routers,
    the MTP eh_proj (bf16 in the release)."""
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and _BLOCK_MODULE.match(n) and not n.endswith(KEEP_DENSE)]


def use_fp8(model: nn.Module, linears: list[str], experts: bool) -> None:
    """Swap the named nn.Linear modules for uninitialised `Fp8Linear`s of the same shapes, and with `experts` hold
    every routed-expert stack in FP8 (`RoutedExperts.use_fp8`). Meant for a model on the meta device, before
    `to_empty`; the loader (or a random init) fills the tensors."""
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, Fp8Linear.like(getattr(owner, leaf)))
    if experts:
        for m in model.modules():
            if hasattr(m, "use_fp8"):
                m.use_fp8()


def holds_fp8(model: nn.Module) -> bool:
    """Whether any weight of the model is held in FP8."""
    return any(p.dtype == FP8_DTYPE for p in model.parameters())


@torch.no_grad()
def fp8_random_(w8: torch.Tensor, scale_inv: torch.Tensor, generator: torch.Generator) -> None:
    """Random FP8 weights in place, on their device: W8 ~ N(0, 1) in e4m3, every block scale 1/sqrt(in), so
    W = W8 * S ~ N(0, 1/in) as the dense init rule (tiny.random_init). Drawn one matrix of a stack at a time, so
    the bf16 draw never needs the whole stack's memory."""
    flat = w8.view(-1, *w8.shape[-2:])
    for i in range(flat.shape[0]):
        flat[i].copy_(torch.randn(flat.shape[1:], generator=generator, device=w8.device, dtype=torch.bfloat16))
    scale_inv.fill_(w8.shape[-1] ** -0.5)
