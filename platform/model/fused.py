"""The memory-bound pieces of a training step as single kernels on the GPU.

Each function here is plain eager PyTorch, and runs as such by default. Where `use_fused(x)` says so (a CUDA tensor
under autograd, i.e. training) it runs compiled by Inductor instead, with every dimension static except the leading
(token) ones: one kernel for the forward and one for the backward, instead of a chain of elementwise passes over
[tokens, width] tensors, and static widths let Triton vectorise its loads. Inference, CUDA-graph capture and the
CPU keep the eager form. The compiler is imported at first use (it costs over a second). `set_mode` switches the
choice for tests ("force": fused on any device) and for benchmarks ("off": eager everywhere); the environment variable
RAYMOE_FUSED=off|force sets it for a whole process (a GPU machine without a working Triton trains with "off").
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F

from raymoe.platform.model.rope import rotate

Mode = Literal["auto", "off", "force"]
_mode: Mode = os.environ.get("RAYMOE_FUSED", "auto")  # type: ignore[assignment]
if _mode not in ("auto", "off", "force"):
    raise ValueError(f"RAYMOE_FUSED={_mode!r}: expected auto, off or force")


@contextlib.contextmanager
def set_mode(mode: Mode) -> Iterator[None]:
    """Within the block: "auto" (fused for CUDA training), "off" (never) or "force" (always, any device)."""
    global _mode
    old, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = old


def use_fused(x: torch.Tensor, training: bool | None = None) -> bool:
    """Whether the fused forms serve `x`: CUDA under autograd (or `training`, decided by a caller whose own
    autograd.Function runs with grad mode off), unless the mode says otherwise."""
    if _mode != "auto":
        return _mode == "force"
    return x.is_cuda and (torch.is_grad_enabled() if training is None else training)


def fusible(fn: Callable[..., object]) -> Callable[..., object]:
    """Decorator: calls run `fn` eagerly, or compiled where `use_fused(first argument, training)` says so. The
    compiled form is built at first use; every dimension of a tensor argument but its last (a vector's only one) is
    marked dynamic, so one compilation serves every token count."""
    @functools.cache
    def compiled() -> Callable[..., object]:
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        return torch.compile(fn, dynamic=False)

    @functools.wraps(fn)
    def run(*args: object, training: bool | None = None) -> object:
        if not use_fused(args[0], training):
            return fn(*args)
        import torch._dynamo
        for a in args:
            if isinstance(a, torch.Tensor):
                for d in range(max(a.dim() - 1, 1) if a.dim() else 0):
                    torch._dynamo.maybe_mark_dynamic(a, d)
        return compiled()(*args)
    return run


# ---- the functions ------------------------------------------------------------------------------------------------

@fusible
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # gate, up: [..., I] -> [..., I]
    return F.silu(gate) * up


@fusible
def swiglu(h: torch.Tensor) -> torch.Tensor:
    # h: [..., 2I] (gate | up, as the stacked gate_up_proj lays them out) -> [..., I]
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


@fusible
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., dim] -> [..., dim]; statistics in fp32, the weight applied in x's dtype (DeepSeek-V3, transformers)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@fusible
def rope_query(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nope: int, interleaved: bool) -> torch.Tensor:
    # q: [N, heads, nope + rope] -> [N, heads, nope + rope] with the rope part rotated (one pass over q)
    return torch.cat([q[..., :nope], rotate(q[..., nope:], cos, sin, interleaved)], dim=-1)


@fusible
def expand_kv(kv: torch.Tensor, k_pe: torch.Tensor, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    # kv: [N, heads, nope + v] (kv_b_proj's output), k_pe: [N, rope] (rotated, shared by all heads)
    # -> k [N, heads, nope + rope], v [N, heads, v]
    k_nope, v = kv[..., :nope], kv[..., nope:]
    k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, kv.shape[1], -1)], dim=-1)
    return k, v


@fusible
def combine(y: torch.Tensor, w: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    # y: [N*k, H] rows sorted by expert, w: [N, k] fp32, inv: [N*k] (row of assignment n*k+j) -> [N, H] in y's dtype
    # (a sum of k gathered rows, written out term by term: compiled, each output element loads its k rows directly
    # instead of reducing across a strided [N, k, H] view)
    N, k = w.shape
    rows = inv.view(N, k)
    out = y.index_select(0, rows[:, 0]).float() * w[:, :1]
    for j in range(1, k):
        out = out + y.index_select(0, rows[:, j]).float() * w[:, j:j + 1]
    return out.to(y.dtype)


@fusible
def combine_backward(g: torch.Tensor, y: torch.Tensor, w_sorted: torch.Tensor,
                     token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # g: [N, H] output gradient, y: [N*k, H] sorted rows, w_sorted: [N*k] fp32 weight of each sorted row,
    # token: [N*k] token of each sorted row -> dy [N*k, H] in y's dtype, dw of each sorted row [N*k] fp32
    gs = g.index_select(0, token)
    dy = (gs.float() * w_sorted[:, None]).to(y.dtype)
    dw = (gs.float() * y.float()).sum(-1)
    return dy, dw


@fusible
def sum_rows_backward(g: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    # g: [N*k, H] gradient of the expert-sorted copies of the tokens -> [N, H]: each token's k rows summed in fp32
    rows = inv.view(-1, k)
    out = g.index_select(0, rows[:, 0]).float()
    for j in range(1, k):
        out = out + g.index_select(0, rows[:, j]).float()
    return out.to(g.dtype)
