"""DeepSeek-V3's Mixture-of-Experts layer: the noaux_tc gate, routed experts stacked per layer, shared experts.

Owns the math of routing and of the experts themselves. It never decides where experts live: the MoE layer calls
one dispatch interface, `ExpertDispatch`, split in two so the shared expert runs while the routed experts work:
`send(layer, hidden, topk_ids, topk_w, lora) -> pending`, then `wait(pending) -> routed output`. With no dispatch
set the layer calls its own `RoutedExperts`; expert-parallel code (raymoe.platform.parallel) installs a dispatch
that sends rows to remote shards. Dispatches compose by one rule: a wrapper (LoRA factors, a compiler-opaque op)
holds an inner dispatch and passes `lora` down to it; the innermost is `LocalDispatch` (the layer's experts) or a
transport. `RoutedExperts` may hold any set of the experts (a contiguous range, or the ids a placement plan gives
an expert-parallel shard) and returns the weighted sum over the (token, expert) pairs it holds; an expert id of -1
is held by nobody (rows a shard gets for its other experts). Finetuning may hand `RoutedExperts` LoRA factors of
its stacked weights (`ExpertLora`); they are applied per expert, factored, and never merged into the stack.
Nothing here knows PEFT, Ray or a transport.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from raymoe.platform import kernels
from raymoe.platform.config import ModelConfig
from raymoe.platform.model import fused
from raymoe.platform.model.fp8 import BLOCK, FP8_DTYPE, dequantize_stack, frozen, keep_dtypes
from raymoe.platform.model.mlp import MLP


class ExpertDispatch:
    """Where an MoE layer's routed experts run. `send` starts the work and returns a handle; `wait` returns the
    routed output [N, H] (the weighted sum over each token's experts). `remote` dispatches leave the process: they
    can never be captured in a CUDA graph or traced by a compiler."""
    remote = False

    def send(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
             lora: dict[str, ExpertLora] | None = None) -> object:
        raise NotImplementedError

    def wait(self, pending: object) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                 lora: dict[str, ExpertLora] | None = None) -> torch.Tensor:
        return self.wait(self.send(layer, hidden, topk_ids, topk_w, lora))


class LocalDispatch(ExpertDispatch):
    """The layer's own `RoutedExperts` behind the dispatch interface (computes in `send`)."""

    def __init__(self, experts: RoutedExperts) -> None:
        self.experts = experts

    def send(self, layer, hidden, topk_ids, topk_w, lora=None):
        return self.experts(hidden, topk_ids, topk_w, lora=lora)

    def wait(self, pending):
        return pending


class _GateLogits(torch.autograd.Function):
    """x W^T in fp32, since routing decides on it. The input gradient is computed in x's dtype, which it is rounded
    to anyway: for bf16 training a tensor-core GEMM where fp32 would run on the CUDA cores (the fp32 forward and the
    weight gradient stay fp32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # x: [N, hidden], w: [E, hidden] fp32 -> [N, E] fp32
        ctx.save_for_backward(x, w)
        return F.linear(x.float(), w.float())

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        dx = g.to(x.dtype) @ w.to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (g.t() @ x.float()).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


class Gate(nn.Module):
    """Sigmoid scores; bias (e_score_correction_bias) used only for selection; group-limited top-k."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.n_experts = cfg.n_routed_experts
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        # fp32 always (as transformers keeps it): gating precision decides which experts run
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):  # keep fp32 through model.to(dtype); still follow device moves
        super()._apply(fn, recurse)
        self.weight.data = self.weight.data.float()
        self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, hidden] -> [N, E] fp32
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _GateLogits.apply(x, self.weight)
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [N, hidden] -> topk_ids [N, k] long, topk_w [N, k] fp32, scores [N, E] fp32
        if torch.is_autocast_enabled(x.device.type):    # bf16 training autocasts matmuls; routing stays fp32
            with torch.autocast(x.device.type, enabled=False):
                scores = self._logits(x).sigmoid()
        else:                                             # (inference: no context manager on the decode path)
            scores = self._logits(x).sigmoid()
        choice = scores + self.e_score_correction_bias
        grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1)                                # [N, G]
        keep_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(-1, self.n_experts)
        topk_ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        topk_w = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            topk_w = topk_w / (topk_w.sum(-1, keepdim=True) + 1e-20)
        return topk_ids, topk_w * self.scaling, scores


@dataclass(frozen=True)
class ExpertLora:
    """A LoRA update of one stacked expert weight, kept factored: W_e + scale * b[e] @ a[e] for held expert e.
    a: [E, r, in], b: [E, out, r] (views of the trainer's parameters: gradients flow back through them).
    With `slots` ([N] long, the adapter slot of each token, -1: none) the factors stack S adapters, adapter-major:
    a [S * E, r, in], b [S * E, out, r] with the scale folded into b (`scale` is then 1); token n's rows on
    expert e use a[slots[n] * E + e] (per-row LoRA, platform.model.multi_lora)."""
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    slots: torch.Tensor | None = None


def gathered_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor,
                  keep: torch.Tensor) -> torch.Tensor:
    """Each row's own LoRA factors, gathered: (x_m a_g^T) b_g^T for g = index[m], zero where `keep` is False.
    x: [M, in]; a: [G, R, in]; b: [G, out, R]; index, keep: [M] -> [M, out] in x's dtype. Used where no grouped GEMM
    serves (CPU decode, compiled steps): per-row LoRA of linears (multi_lora) and of (token, expert) pairs."""
    low = torch.bmm(a.index_select(0, index).to(x.dtype), x[:, :, None])                # [M, R, 1]
    return torch.bmm(b.index_select(0, index).to(x.dtype), low).squeeze(-1) * keep.to(x.dtype)[:, None]


@functools.cache
def _cpu_grouped_mm(dtype: torch.dtype) -> bool:
    """Whether this torch has a CPU _grouped_mm for `dtype` (a C++ loop of GEMMs, with a backward)."""
    try:
        torch._grouped_mm(torch.ones(2, 8, dtype=dtype), torch.ones(1, 8, 8, dtype=dtype),
                          offs=torch.tensor([2], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class _SortRows(torch.autograd.Function):
    """xs = x[order // k]: each token's row once per chosen expert, sorted by expert (order: a permutation of the
    N * k assignments, inv its inverse). The backward gathers with inv and sums each token's k rows in fp32, where
    autograd's would scatter-add into x (`fuse`: as one kernel, fused.sum_rows_backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int, fuse: bool) -> torch.Tensor:
        # x: [N, H] -> [N*k, H]
        ctx.save_for_backward(inv)
        ctx.k, ctx.fuse = k, fuse
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (inv,) = ctx.saved_tensors
        return fused.sum_rows_backward(g, inv, ctx.k, training=ctx.fuse), None, None, None, None


class _Combine(torch.autograd.Function):
    """out[n] = sum_j w[n, j] * y[inv[n * k + j]]: the expert-sorted rows un-sorted (a gather, so deterministic) and
    reduced over each token's k experts in fp32. The backward is a gather, a product and a row-wise dot product,
    where autograd's would scatter with atomics. `fuse`: each direction as one kernel (fused.combine*), where the
    eager form is a gather and a [1, k] @ [k, H] batched product per token."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, w: torch.Tensor, order: torch.Tensor, inv: torch.Tensor,
                fuse: bool) -> torch.Tensor:
        # y: [N*k, H] sorted by expert, w: [N, k] fp32 -> [N, H] in y's dtype
        N, k = w.shape
        ctx.fuse, ctx.k = fuse, k
        if fuse:
            ctx.save_for_backward(y, w, order, inv)
            return fused.combine(y, w, inv, training=True)
        yu = y.index_select(0, inv).view(N, k, -1)
        ctx.save_for_backward(yu, w, order, inv)
        return torch.bmm(w.to(y.dtype)[:, None, :], yu).squeeze(1)   # the GEMM accumulates in fp32

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        ys, w, order, inv = ctx.saved_tensors
        k = ctx.k
        g = g.to(ys.dtype)
        if ctx.fuse:
            dy, dw = fused.combine_backward(g, ys, w.flatten()[order], order // k, training=True)
            return dy, dw[inv].view(w.shape).to(w.dtype), None, None, None
        dy = dw = None
        if ctx.needs_input_grad[0]:
            dy = g.index_select(0, order // k).mul_(w.flatten()[order].to(g.dtype)[:, None])
        if ctx.needs_input_grad[1]:
            dw = torch.bmm(ys, g[:, :, None]).squeeze(-1).to(w.dtype)                      # [N, k]
        return dy, dw, None, None, None


GATHER_LORA_PAIRS = 1024   # CPU inference: per-row expert LoRA gathers each pair's factors up to this many pairs
GATHER_PAIRS = 16          # CPU inference: the gathered-weights path serves up to this many (token, expert) pairs
DENSE_WASTE = 4            # CPU inference: every expert over every token when that is at most this many times the
                           # work of the chosen experts (n_routed_experts <= DENSE_WASTE * num_experts_per_tok)
STATIC_PATHS = ("gathered", "dense")   # inference paths with static shapes: a compiler can trace them


def _per_row(lora: dict[str, ExpertLora] | None) -> dict[str, ExpertLora] | None:
    """`lora` if it is per-row (every factor carries the rows' adapter slots), else None."""
    if lora and all(f.slots is not None for f in lora.values()):
        return lora
    return None


class RoutedExperts(nn.Module):
    """Some experts of one MoE layer, stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]. Either the range
    [first, first + count), or any sorted `expert_ids` (an expert-parallel shard's share under a placement plan).

    Paths: the grouped GEMM on CUDA bf16, and on the CPU under autograd or with LoRA (torch's CPU grouped GEMM);
    without autograd on the CPU, gathered weights for a few tokens, every expert densely for many tokens over few
    experts, or a padded batch (`inference_path`); a per-expert loop where the grouped GEMM is missing. `lora` maps "gate_up_proj" / "down_proj" to their factors.

    `use_fp8()` holds the stacks in FP8 instead (inference only): e4m3 stacks of the same shapes with per-expert
    128 x 128 block scales `gate_up_proj_scale_inv` [E, 2 ceil(I/128), ceil(H/128)] (gate's blocks, then up's) and
    `down_proj_scale_inv` [E, ceil(H/128), ceil(I/128)]. The grouped path then runs the weight-only FP8 grouped GEMM
    (Triton, `kernels.fp8_gemm.fp8_grouped`) where `kernels.enabled(x)`; every other path dequantises per call (the
    reference). Gate and up go through one launch when I % 128 == 0 (their blocks line up in the stack), else one
    each."""

    def __init__(self, cfg: ModelConfig, first: int = 0, count: int | None = None,
                 expert_ids: list[int] | None = None) -> None:
        super().__init__()
        if expert_ids is None:
            count = cfg.n_routed_experts - first if count is None else count
            expert_ids = list(range(first, first + count))
        self.expert_ids = sorted(expert_ids)
        self.count, self.n_total = len(self.expert_ids), cfg.n_routed_experts
        self.first = self.expert_ids[0] if self.expert_ids else 0
        contiguous = self.expert_ids == list(range(self.first, self.first + self.count))
        # global id -> local index (-1: not held; the extra last entry serves id -1), for non-contiguous sets
        self._table = None if contiguous else torch.full((self.n_total + 1,), -1, dtype=torch.long,
                                                         device="cpu").index_copy_(
            0, torch.tensor(self.expert_ids, dtype=torch.long, device="cpu"), torch.arange(self.count, device="cpu"))
        inter, h = cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.count, 2 * inter, h))
        self.down_proj = nn.Parameter(torch.empty(self.count, h, inter))
        self.fp8 = False

    # ---- FP8 storage ---------------------------------------------------------------------------------------------
    def use_fp8(self) -> None:
        """Hold the stacks in FP8 from now on: new uninitialised e4m3 stacks and fp32 block scales on the stacks'
        device (the loader fills them; see the class docstring for the layout)."""
        if self.fp8:
            return
        E, two_i, h = self.gate_up_proj.shape
        inter, dev = two_i // 2, self.gate_up_proj.device
        nb = lambda n: -(-n // BLOCK)                                          # noqa: E731
        self.gate_up_proj = frozen(torch.empty(E, two_i, h, dtype=FP8_DTYPE, device=dev))
        self.gate_up_proj_scale_inv = frozen(torch.empty(E, 2 * nb(inter), nb(h), device=dev))
        self.down_proj = frozen(torch.empty(E, h, inter, dtype=FP8_DTYPE, device=dev))
        self.down_proj_scale_inv = frozen(torch.empty(E, nb(h), nb(inter), device=dev))
        self.fp8 = True

    def _apply(self, fn, recurse=True):   # FP8 stacks and their scales keep their dtypes through .to(dtype)
        if not self.fp8:
            return super()._apply(fn, recurse)
        return super()._apply(keep_dtypes(self, fn), recurse)

    def fp8_parts(self, name: str, e: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(e4m3 stack [E, N, K], its scales [E, ceil(N/128), ceil(K/128)]) pieces of FP8 weight `name` whose 128-row
        blocks each line up: the whole stack, or gate and up apart when I % 128 != 0. `e`: local expert e only
        (E = 1)."""
        w, s = getattr(self, name), getattr(self, f"{name}_scale_inv")
        if e is not None:
            w, s = w[e:e + 1], s[e:e + 1]
        inter = w.shape[1] // 2
        if name != "gate_up_proj" or inter % BLOCK == 0:
            return [(w, s)]
        nb = s.shape[1] // 2
        return [(w[:, :inter], s[:, :nb]), (w[:, inter:], s[:, nb:])]

    def dense(self, name: str, dtype: torch.dtype, e: int | None = None) -> torch.Tensor:
        """Stacked weight `name` ("gate_up_proj" / "down_proj") in `dtype`: the parameter itself, or, in FP8,
        dequantised (a new tensor per call). `e`: local expert e's matrix only ([N, K])."""
        if not self.fp8:
            w = getattr(self, name)
            return w if e is None else w[e]
        parts = [dequantize_stack(w, s, dtype) for w, s in self.fp8_parts(name, e)]
        if e is not None:
            parts = [p[0] for p in parts]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _fp8_kernel(self, x: torch.Tensor) -> bool:
        return self.fp8 and kernels.enabled(x) and x.dtype in (torch.bfloat16, torch.float16)

    def _base_grouped(self, x: torch.Tensor, name: str, offs: torch.Tensor) -> torch.Tensor:
        # x: [M, in] sorted by expert, offs: [E] group ends -> [M, out] (rows past the last group: undefined)
        if self._fp8_kernel(x):
            from raymoe.platform.kernels.fp8_gemm import fp8_grouped
            ys = [fp8_grouped(x, w, s, offs) for w, s in self.fp8_parts(name)]
            return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
        return torch._grouped_mm(x, self.dense(name, x.dtype).transpose(1, 2), offs=offs)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                lora: dict[str, ExpertLora] | None = None) -> torch.Tensor:
        # x: [N, H]; topk_ids/topk_w: [N, k] (global expert ids) -> [N, H] sum over the held experts
        rows = _per_row(lora) if topk_ids.numel() <= GATHER_LORA_PAIRS else None
        if self._grouped_ok(x, lora, gather_lora=rows is not None):
            return self._grouped(x, topk_ids, topk_w, lora)
        if not torch.is_grad_enabled() and (not lora or rows is not None):
            path = self.inference_path(topk_ids.shape[0], topk_ids.shape[1], rows is not None)
            if path == "gathered":
                return self._gathered(x, topk_ids, topk_w, rows)
            if path == "dense":
                return self._dense(x, topk_ids, topk_w, rows)
            return self._padded(x, topk_ids, topk_w, rows)
        return self._loop(x, topk_ids, topk_w, lora)

    def inference_path(self, tokens: int, k: int, per_row_lora: bool = False) -> str:
        """The path of an inference call without autograd that does not take the grouped GEMM (the CPU, or CUDA
        in fp32), for `tokens` rows of k experts each: "gathered" (at most GATHER_PAIRS pairs), "dense" (more,
        where every expert over every token costs at most DENSE_WASTE times the chosen experts' work), else
        "padded". The first two need every expert held here; they have static shapes (STATIC_PATHS), so a compiled
        step can trace them, per-row LoRA (`per_row_lora`: each chosen pair's factors gathered) included."""
        if self.count != self.n_total or self._table is not None:
            return "padded"
        if tokens * k <= GATHER_PAIRS:
            return "gathered"
        if self.count <= DENSE_WASTE * k and (not per_row_lora or tokens * k <= GATHER_LORA_PAIRS):
            return "dense"
        return "padded"

    def _local(self, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat local expert index of each (token, slot) pair, and whether this module holds it."""
        # topk_ids: [N, k] global ids (-1: nobody's) -> local, held: [N * k]
        if self._table is None:
            local = topk_ids.flatten() - self.first
        else:
            if self._table.device != topk_ids.device:
                self._table = self._table.to(topk_ids.device)
            local = self._table[topk_ids.flatten()]
        return local, (local >= 0) & (local < self.count)

    def _padded(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                lora: dict[str, ExpertLora] | None = None) -> torch.Tensor:
        """Many tokens without autograd (CPU inference): rows sorted by expert into an [E, max_rows, H] buffer,
        two batched products for all experts at once. A dozen ops instead of a few per expert. Per-row LoRA
        (`lora`: factors with slots) adds each pair's own factors, gathered (`_pair_lora`)."""
        k = topk_ids.shape[1]
        local, held = self._local(topk_ids)
        pick = held.nonzero().squeeze(1)
        if pick.numel() == 0:
            return torch.zeros_like(x)
        e = local[pick]
        order = e.argsort(stable=True)
        pick, e = pick[order], e[order]
        counts = torch.bincount(e, minlength=self.count)
        starts = counts.cumsum(0) - counts
        slot = torch.arange(e.numel(), device=x.device) - starts[e]            # row within its expert's group
        rows = pick // k
        xr = x[rows]                                                            # [A, H] each pair's token
        buf = x.new_zeros(self.count, int(counts.max()), x.shape[1])
        buf[e, slot] = xr
        h = torch.bmm(buf, self.dense("gate_up_proj", x.dtype).transpose(1, 2))[e, slot]   # [A, 2I]
        if lora and "gate_up_proj" in lora:
            h += self._pair_lora(lora["gate_up_proj"], xr, rows, e)
        act = fused.swiglu(h)                                                           # [A, I]
        buf = act.new_zeros(self.count, buf.shape[1], act.shape[1])
        buf[e, slot] = act
        y = torch.bmm(buf, self.dense("down_proj", x.dtype).transpose(1, 2))[e, slot]      # [A, H]
        if lora and "down_proj" in lora:
            y += self._pair_lora(lora["down_proj"], act, rows, e)
        return torch.zeros_like(x).index_add_(0, rows, y * topk_w.flatten()[pick].to(x.dtype)[:, None])

    def _gathered(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                  lora: dict[str, ExpertLora] | None = None) -> torch.Tensor:
        """A few tokens (CPU decode): gather the chosen experts' weights and run two batched products, instead of
        a dozen small per-expert calls. Copies k expert matrices per token, so only for tiny batches."""
        N, k = topk_ids.shape
        ids = topk_ids.flatten().clamp(min=0)                                           # id -1: weight 0 below
        rows = torch.arange(N, device=x.device).repeat_interleave(k)                    # [N*k] each pair's token
        xs = x.index_select(0, rows)                                                    # [N*k, H]
        h = torch.bmm(self.dense("gate_up_proj", x.dtype)[ids], xs[:, :, None]).squeeze(-1)   # [N*k, 2I]
        if lora and "gate_up_proj" in lora:
            h += self._pair_lora(lora["gate_up_proj"], xs, rows, ids)
        act = fused.swiglu(h)                                                           # [N*k, I]
        y = torch.bmm(self.dense("down_proj", x.dtype)[ids], act[:, :, None]).squeeze(-1)      # [N*k, H]
        if lora and "down_proj" in lora:
            y += self._pair_lora(lora["down_proj"], act, rows, ids)
        w = torch.where(topk_ids >= 0, topk_w, 0).to(x.dtype)
        return (y.view(N, k, -1) * w[..., None]).sum(1)

    def _dense(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
               lora: dict[str, ExpertLora] | None = None) -> torch.Tensor:
        """Many tokens over few experts (CPU decode of a small model): every expert on every token, as two plain
        GEMMs over the experts side by side, with the routing weights (0 for the experts a token did not choose)
        applied between them. No sort, no padding, no host sync, static shapes; costs n_routed_experts / k times
        the chosen experts' work, so only where that is small (`inference_path`). Per-row LoRA (`lora`: factors
        with slots) adds each chosen pair's own update (`_pair_lora`) into its expert's slot of the dense rows."""
        N, k = topk_ids.shape
        E, two_i, h = self.count, self.gate_up_proj.shape[1], x.shape[1]
        w = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter_add_(            # [N, E]; id -1: weight 0
            1, topk_ids.clamp(min=0), torch.where(topk_ids >= 0, topk_w, 0).to(x.dtype))
        hid = F.linear(x, self.dense("gate_up_proj", x.dtype).reshape(E * two_i, h)).view(N, E, two_i)
        if lora:
            ids = topk_ids.flatten().clamp(min=0)                                       # [N*k]
            rows = torch.arange(N, device=x.device).repeat_interleave(k)                # [N*k] each pair's token
            pairs = rows * E + ids                                                      # [N*k] its (token, expert)
            chosen = (topk_ids.flatten() >= 0).to(x.dtype)[:, None]                     # [N*k, 1] id -1: none
        if lora and "gate_up_proj" in lora:
            up = self._pair_lora(lora["gate_up_proj"], x.index_select(0, rows), rows, ids) * chosen   # [N*k, 2I]
            hid = hid.reshape(N * E, two_i).index_add(0, pairs, up).view(N, E, two_i)
        act = fused.swiglu(hid) * w[:, :, None]                                         # [N, E, I]
        down = self.dense("down_proj", x.dtype).permute(1, 0, 2).reshape(h, -1)          # [H, E * I]
        y = F.linear(act.reshape(N, -1), down)                                          # [N, H]
        if lora and "down_proj" in lora:                # act is weighted already: the update carries the weight
            pair_act = act.reshape(N * E, -1).index_select(0, pairs)                    # [N*k, I]
            y = y + (self._pair_lora(lora["down_proj"], pair_act, rows, ids) * chosen).view(N, k, h).sum(1)
        return y

    def _pair_lora(self, f: ExpertLora, x: torch.Tensor, rows: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Per-row LoRA of (token, expert) pairs, each with its own factors gathered (a few pairs: CPU decode).
        x: [A, in] the pairs' inputs; rows: [A] their tokens; e: [A] local expert -> [A, out] (0: no adapter)."""
        slot = f.slots.index_select(0, rows)                                           # [A], -1: base
        return gathered_lora(x, f.a, f.b, slot.clamp(min=0) * self.count + e, slot >= 0) * f.scale

    def _grouped_ok(self, x: torch.Tensor, lora: dict[str, ExpertLora] | None = None,
                    gather_lora: bool = False) -> bool:
        """Grouped GEMM: CUDA bf16 (static shapes, no host sync: CUDA-graph safe), or the CPU when training or with
        LoRA, where torch has the kernel for the dtype; 16-byte-aligned rows. `gather_lora`: per-row LoRA over a few
        (token, expert) pairs at inference, where gathering each pair's factors beats the CPU kernel (a loop of
        GEMMs with a host sync per group, over S x E groups)."""
        if self._fp8_kernel(x):
            return True        # the FP8 grouped GEMM (Triton): any width, no alignment needed
        if not hasattr(torch, "_grouped_mm"):
            return False
        if x.is_cuda:
            if x.dtype != torch.bfloat16:
                return False   # CUDA's grouped GEMM takes bf16 (and has a backward: training uses it too)
        elif (x.device.type != "cpu" or not (torch.is_grad_enabled() or (lora and not gather_lora))
              or not _cpu_grouped_mm(x.dtype)):
            return False       # CPU inference (per-row LoRA of a few pairs too) keeps _gathered / _padded
        align = 16 // x.element_size()
        return x.shape[1] % align == 0 and self.down_proj.shape[2] % align == 0

    def _grouped(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                 lora: dict[str, ExpertLora] | None = None) -> torch.Tensor:
        k = topk_ids.shape[1]
        local, held = self._local(topk_ids)                                   # [N*k]
        key = torch.where(held, local, self.count)                            # experts held elsewhere sort last
        order = key.argsort(stable=True)
        counts = torch.zeros(self.count + 1, dtype=torch.int32, device=x.device)
        counts.index_add_(0, key, torch.ones_like(key, dtype=torch.int32))
        offs = counts[:-1].cumsum(0, dtype=torch.int32)                       # group ends over the sorted rows
        inv = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel(), device=x.device))
        fuse = fused.use_fused(x)                                             # training on a GPU
        xs = _SortRows.apply(x, order, inv, k, fuse)                          # [N*k, H] sorted by expert
        partial = self.count < self.n_total
        if partial and torch.is_grad_enabled():    # rows past the last group get an undefined input gradient
            xs = torch.where(held[order][:, None], xs, 0)
        rows = self._row_segments(key, order, k, lora)
        h = self._grouped_proj(xs, "gate_up_proj", offs, lora, rows)          # [N*k, 2I]
        act = fused.swiglu(h)
        y = self._grouped_proj(act.contiguous(), "down_proj", offs, lora, rows)   # [N*k, H]
        y = torch.where(held[order][:, None], y, 0)    # rows past the last group (held elsewhere, id -1): undefined
        w = torch.where(topk_ids >= 0, topk_w, 0)                             # an id -1's weight means nothing
        return _Combine.apply(y, w, order, inv, fuse).to(x.dtype)

    def _row_segments(self, key: torch.Tensor, order: torch.Tensor, k: int, lora: dict[str, ExpertLora] | None):
        """Per-row LoRA: the expert-sorted rows grouped again by (adapter slot, expert), rows of no adapter (or of
        experts held elsewhere) last, as `multi_lora.Segments`; None without per-row factors."""
        f = next((f for f in (lora or {}).values() if f.slots is not None), None)
        if f is None:
            return None
        from raymoe.platform.model.multi_lora import Segments
        S = f.a.shape[0] // self.count
        slot = f.slots.index_select(0, order // k)                            # [N*k] of each sorted row
        e = key.index_select(0, order)                                        # local expert (count: elsewhere)
        return Segments(torch.where((slot >= 0) & (e < self.count), slot * self.count + e, S * self.count),
                        S * self.count)

    def _grouped_proj(self, x: torch.Tensor, name: str, offs: torch.Tensor,
                      lora: dict[str, ExpertLora] | None, rows=None) -> torch.Tensor:
        """x W_e^T (+ scale * (x A_e^T) B_e^T) for each expert's rows: the LoRA term as two rank-r grouped GEMMs
        (per-row LoRA: over the rows regrouped by adapter and expert, `rows`)."""
        # x: [M, in] sorted by expert, offs: [E] group ends -> [M, out]
        y = self._base_grouped(x, name, offs)
        f = lora.get(name) if lora else None
        if f is None:
            return y
        if f.slots is not None:
            return rows.add_to(y, rows.lora(x, f.a.to(x.dtype), f.b.to(x.dtype)))
        a, b = f.a.to(x.dtype), f.b.to(x.dtype)
        pad = -a.shape[1] % (16 // x.element_size())   # the kernel wants 16-byte rows; zero rank changes nothing
        if pad:
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        low = torch._grouped_mm(x, a.transpose(1, 2), offs=offs).mul_(f.scale)                # [M, r]
        return y.add_(torch._grouped_mm(low, b.contiguous().transpose(1, 2), offs=offs))

    def _loop(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
              lora: dict[str, ExpertLora] | None = None) -> torch.Tensor:
        out = torch.zeros_like(x)
        local, held = self._local(topk_ids)
        if not bool(held.any()):
            return out
        pick = held.nonzero().squeeze(1)                                  # indices into the [N * k] assignments
        local = local[pick]
        order = local.argsort(stable=True)
        pick, local = pick[order], local[order]
        counts = torch.bincount(local, minlength=self.count).tolist()
        rows = pick // topk_ids.shape[1]
        weights = topk_w.flatten()[pick].to(x.dtype)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            r = rows[start:start + n]
            y = self._linear(fused.swiglu(self._linear(x[r], "gate_up_proj", e, lora, r)), "down_proj", e, lora, r)
            out.index_add_(0, r, y * weights[start:start + n, None])
            start += n
        return out

    def _linear(self, x: torch.Tensor, name: str, e: int, lora: dict[str, ExpertLora] | None,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        # x: [n, in] rows of held expert e (of `tokens` [n]) -> [n, out]
        y = F.linear(x, self.dense(name, x.dtype, e))
        f = lora.get(name) if lora else None
        if f is None:
            return y
        if f.slots is not None:                      # per-row: each row's adapter's factors of expert e, gathered
            slot = f.slots[tokens]
            g = slot.clamp(min=0) * self.count + e
            low = torch.bmm(x[:, None, :], f.a[g].to(x.dtype).transpose(1, 2))               # [n, 1, r]
            d = torch.bmm(low, f.b[g].to(x.dtype).transpose(1, 2)).squeeze(1) * f.scale      # [n, out]
            return y + torch.where((slot >= 0)[:, None], d, 0)
        return y + F.linear(F.linear(x, f.a[e].to(x.dtype)), f.b[e].to(x.dtype)) * f.scale


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, experts: RoutedExperts | None = None) -> None:
        super().__init__()
        self.layer, self.n_experts = layer, cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = experts if experts is not None else RoutedExperts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.dispatch: ExpertDispatch | None = None   # set by expert-parallel code; None = the local experts
        # tokens routed to each expert [E], summed on the model's device without a host sync (load statistics);
        # None: not counted
        self.expert_load: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, hidden] -> [N, hidden]
        topk_ids, topk_w, _ = self.gate(x)
        if self.expert_load is not None:
            self.expert_load.index_add_(0, topk_ids.flatten(), torch.ones_like(topk_ids.flatten()))
        if self.dispatch is None:
            out = self.experts(x, topk_ids, topk_w)
            return out if self.shared_experts is None else out + self.shared_experts(x)
        pending = self.dispatch.send(self.layer, x, topk_ids, topk_w)
        shared = self.shared_experts(x) if self.shared_experts is not None else None   # while the experts work
        out = self.dispatch.wait(pending)
        return out if shared is None else out + shared

    def count_load(self, on: bool = True) -> None:
        """Start (zeroed) or stop counting tokens per routed expert into `expert_load`."""
        dev = next(self.parameters()).device
        self.expert_load = torch.zeros(self.n_experts, dtype=torch.long, device=dev) if on else None
