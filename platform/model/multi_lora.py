"""Per-row LoRA: many adapters applied in one batch, each row with its own, factored and never merged.

Owns the stacked factor buffers of every LoRA-capable weight of the main decoder layers and the math that applies
them: y += (x A_s^T) (s B_s)^T for the adapter slot s of each row, as grouped GEMMs over rows sorted by slot (the
idea of Punica's SGMV / S-LoRA: one batched product per weight for all adapters of the batch, never a loop over
adapters). Slot -1 is the base model: its rows sort past the last group and cost no GEMM work.

- `LoraRows`: the batch's only LoRA input, the adapter slot of each token, bound for one forward (`bind`) by
  whoever runs the model; every LoRA module of the model reads it. Unbound, every module is exactly its base.
- `LoraLinear`: an nn.Linear (attention projections, dense and shared-expert MLPs) with stacks
  `lora_a` [S, R, in] and `lora_b` [S, out, R] (the scale folded into B); it stays an nn.Linear, same weight.
  `LoraFp8Linear` is the same over an FP8 base (`Fp8Linear`); routed experts in FP8 take their factors as usual.
- `RowLoraDispatch`: the MoE dispatch wrapper that hands the routed experts' stacks ([S * E, R, in] and
  [S * E, out, R], adapter-major) with the rows' slots down to `RoutedExperts` as `ExpertLora`. Over a remote
  dispatch (expert shards) it holds no stacks (E = 0 here: the shards hold theirs, same slot numbering) and only
  the rows' slots travel down; `RowLora.remote` names those weights so the engine can write them to the shards.
- `MLA` reads kv_b_proj's stacks itself, since its absorbed path never calls kv_b_proj.

Buffers are preallocated (S = max adapters resident, R = max rank; smaller ranks are zero-padded), so loading an
adapter is a copy into a slot: CUDA graphs and compiled steps see it without recapture. Nothing here knows PEFT,
files or engines; `install` adds the buffers to a model once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.platform.model.fp8 import Fp8Linear
from raymoe.platform.model.moe import ExpertDispatch, ExpertLora, MoE, _cpu_grouped_mm, gathered_lora


class Segments:
    """Rows grouped for a grouped GEMM: `key` [M] gives each row's group in 0..count-1, or `count` for none.
    Rows are sorted by group (stable; those with none last) and `offs` [count] holds the group ends."""

    def __init__(self, key: torch.Tensor, count: int) -> None:
        self.count = count
        self.order = key.argsort(stable=True)                                           # [M]
        sizes = torch.zeros(count + 1, dtype=torch.int32, device=key.device)
        sizes.index_add_(0, key, torch.ones_like(key, dtype=torch.int32))
        self.offs = sizes[:-1].cumsum(0, dtype=torch.int32)                             # [count]
        self.key = key.index_select(0, self.order)                                      # [M] sorted
        self.held = (self.key < count)[:, None]                                         # [M, 1]

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, self.order)

    @staticmethod
    def grouped(x: torch.Tensor, w: torch.Tensor) -> bool:
        """Whether `mm` takes torch's grouped GEMM for x @ w[g] (else a gathered product per row)."""
        # (torch.compile on the CPU: some torch versions trace the grouped GEMM as bf16-only)
        return (x.is_cuda or not torch.compiler.is_compiling()) and _grouped_ok(x, w)

    def mm(self, xs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """xs @ w[g] for the rows of each group g. xs: [M, in] sorted; w: [count, in, out] -> [M, out] sorted, with
        undefined values on rows of no group (mask with `held`)."""
        if self.grouped(xs, w):
            return torch._grouped_mm(xs, w, offs=self.offs)
        g = self.key.clamp(max=self.count - 1)                       # a gathered product per row (any device, dtype)
        return torch.bmm(xs[:, None, :], w.index_select(0, g)).squeeze(1)

    def lora(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The factored update of each row: (x a_g^T) b_g^T, zero on rows of no group; rows in x's order.
        x: [M, in]; a: [count, R, in]; b: [count, out, R] -> [M, out] (sorted rows, see `add_to`)."""
        xs = self.sort(x)
        low = self.mm(xs, a.transpose(1, 2))                                            # [M, R]
        return torch.where(self.held, self.mm(low, b.transpose(1, 2)), 0)              # [M, out]

    def add_to(self, y: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """y [M, out] (rows in the original order) += ys [M, out] (sorted rows); in place, returns y."""
        return y.index_add_(0, self.order, ys.to(y.dtype))

    def unsort(self, ys: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(ys).index_copy_(0, self.order, ys)


def _grouped_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch's grouped GEMM serves x @ w[g]: CUDA bf16, or the CPU where it has the kernel for the dtype; rows and
    weight strides 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.is_cuda:                       # (the CUDA kernel takes at most 1024 groups: more gather per row)
        ok = x.dtype == torch.bfloat16 and w.shape[0] < 1024
    else:
        ok = x.device.type == "cpu" and _cpu_grouped_mm(x.dtype)
    align = 16 // x.element_size()
    return ok and x.shape[1] % align == 0 and w.shape[1] % align == 0 and w.shape[2] % align == 0


class LoraRows:
    """The adapter slot of each token of the batch being computed (None: no adapter anywhere, every module is its
    base), and its groupings, shared by all LoRA modules of one model. `slots` is an input of the step: the runner
    binds it (a CUDA graph's static buffer, a compiled step's argument) and unbinds it after the forward."""

    def __init__(self, max_loras: int, heads: int) -> None:
        self.max_loras, self.heads = max_loras, heads
        self.slots: torch.Tensor | None = None
        self.tokens: Segments | None = None        # rows = tokens, group = slot
        self.token_heads: Segments | None = None   # rows = (token, head), group = slot
        self.head_slots: Segments | None = None    # rows = (token, head), group = (slot, head)

    def bind(self, slots: torch.Tensor | None) -> None:
        # slots: [N] long, -1 = base
        self.slots = slots
        if slots is None:
            self.tokens = self.token_heads = self.head_slots = None
            return
        S, H = self.max_loras, self.heads
        key = torch.where(slots >= 0, slots, S)                                       # [N]
        self.tokens = Segments(key, S)
        per_head = key.repeat_interleave(H)                                             # [N * H]
        self.token_heads = Segments(per_head, S)
        head = torch.arange(H, device=slots.device).repeat(slots.shape[0])
        self.head_slots = Segments(torch.where(per_head < S, per_head * H + head, S * H), S * H)


def _with_rows(mod: LoraLinear | LoraFp8Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # x: [N, in], y: [N, out] the base's output -> y + each row's adapter update (y itself when rows are unbound)
    seg = mod.rows.tokens
    if seg is None:
        return y
    a, b = mod.lora_a.to(x.dtype), mod.lora_b.to(x.dtype)
    if seg.grouped(x, a.transpose(1, 2)):            # grouped GEMMs over the rows sorted by slot
        return seg.add_to(y, seg.lora(x, a, b))
    slots = mod.rows.slots        # else each row's own factors in the rows' order (no sort without the grouped GEMM)
    return y + gathered_lora(x, a, b, slots.clamp(min=0), slots >= 0)


class LoraLinear(nn.Linear):
    """An nn.Linear whose rows may each carry an adapter: base(x) + (x A_s^T) (s B_s)^T for slot s of the row.
    Made from an existing nn.Linear by `install` (same module, weight and name; two buffers more)."""
    lora_a: torch.Tensor     # [S, R, in]
    lora_b: torch.Tensor     # [S, out, R], scale folded in
    rows: LoraRows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in] -> [N, out]
        return _with_rows(self, x, F.linear(x, self.weight, self.bias))


class LoraFp8Linear(Fp8Linear):
    """`LoraLinear` over an FP8 base (`Fp8Linear`): the base computed from its FP8 weight, the adapters in the
    activations' dtype."""
    lora_a: torch.Tensor     # [S, R, in]
    lora_b: torch.Tensor     # [S, out, R], scale folded in
    rows: LoraRows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in] -> [N, out]
        return _with_rows(self, x, super().forward(x))


class RowLoraDispatch(ExpertDispatch):
    """MoE.dispatch of a layer whose routed experts carry per-row adapters: wraps the layer's dispatch (`inner`,
    else its local experts) and, while rows are bound, hands the stacks and the slots down as `ExpertLora`.
    Over a remote inner dispatch the stacks are empty ([0, R, in] / [0, out, R]): only the slots matter there."""

    def __init__(self, moe: MoE, rows: LoraRows, max_rank: int, dtype: torch.dtype) -> None:
        # dtype: the stacks' (the activations'; FP8 experts' stacks are not FP8)
        self.experts = moe.experts
        self.inner: ExpertDispatch | None = moe.dispatch      # None: the layer's own experts
        self.rows = rows
        ex = moe.experts
        S, E = rows.max_loras, (0 if self.remote else ex.count)
        p = ex.gate_up_proj
        new = dict(device=p.device, dtype=dtype)
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in ("gate_up_proj", "down_proj"):
            _, out_f, in_f = getattr(ex, name).shape
            self.stacks[name] = (torch.zeros(S * E, max_rank, in_f, **new), torch.zeros(S * E, out_f, max_rank, **new))

    @property
    def remote(self) -> bool:
        return self.inner is not None and self.inner.remote

    def send(self, layer, hidden, topk_ids, topk_w, lora=None):
        slots = self.rows.slots
        if slots is not None:
            lora = dict(lora or {}) | {n: ExpertLora(a, b, 1.0, slots) for n, (a, b) in self.stacks.items()}
        if self.inner is None:
            return self.experts(hidden, topk_ids, topk_w, lora=lora)
        return self.inner.send(layer, hidden, topk_ids, topk_w, lora)

    def wait(self, pending):
        return pending if self.inner is None else self.inner.wait(pending)


class RowLora:
    """What `install` gave a model: the rows and the stacks of every LoRA-capable weight, by parameter name
    (`model.layers.0.self_attn.q_a_proj.weight`, `model.layers.1.mlp.experts.gate_up_proj`, ...): (a, b, experts)
    with a [S, R, in] / b [S, out, R] for a linear weight, [S * E, R, in] / [S * E, out, R] for stacked experts."""

    def __init__(self, rows: LoraRows, max_rank: int) -> None:
        self.rows, self.max_rank = rows, max_rank
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.expert_ids: dict[str, list[int]] = {}    # stacked-expert weight -> the global expert ids it holds
        # routed-expert weights whose experts live on remote shards: name -> (layer, "gate_up_proj" | "down_proj");
        # `write` leaves them to whoever owns the shards
        self.remote: dict[str, tuple[int, str]] = {}

    @torch.no_grad()
    def write(self, slot: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put one adapter into `slot`: factors[name] = (a [r, in], b [out, r]) or, for stacked experts, the
        adapter's (a [E_all, r, in], b [E_all, out, r]); scale already in b. Weights it does not name get zeros."""
        for name, (A, B, experts) in self.stacks.items():
            fa, fb = factors.get(name, (None, None))
            if fa is not None and fa.dim() == 3:
                ids = torch.tensor(self.expert_ids[name], dtype=torch.long)
                fa, fb = fa.index_select(0, ids), fb.index_select(0, ids)      # this model's share of the experts
            write_slot(A, B, experts, slot, fa, fb)


@torch.no_grad()
def write_slot(A: torch.Tensor, B: torch.Tensor, experts: int, slot: int, fa: torch.Tensor | None = None,
               fb: torch.Tensor | None = None) -> None:
    """Overwrite `slot` of the stacks A [S * E, R, in] / B [S * E, out, R] (adapter-major; E = 1 for a linear
    weight) with fa [(E,) r, in] / fb [(E,) out, r], zero-padded to R; zeros where fa is None."""
    a = A.view(-1, experts, *A.shape[1:])[slot]          # [E, R, in]
    b = B.view(-1, experts, *B.shape[1:])[slot]          # [E, out, R]
    a.zero_()
    b.zero_()
    if fa is None:
        return
    if fa.dim() == 2:
        fa, fb = fa[None], fb[None]
    r = fa.shape[1]
    a[:, :r].copy_(fa)
    b[:, :, :r].copy_(fb)


def padded_rank(max_rank: int) -> int:
    """The stacks' rank R for adapters of rank up to `max_rank`: rounded up to 8, for aligned GEMM rows."""
    return -(-max_rank // 8) * 8


def install(model: nn.Module, max_loras: int, max_rank: int) -> RowLora:
    """Give every LoRA-capable weight of `model`'s main decoder layers (not the MTP modules) zeroed stacks for
    `max_loras` adapters of rank up to `max_rank` (rounded up to 8, for aligned GEMM rows). Once per model: a
    second call returns the first one's result if the sizes agree."""
    done: RowLora | None = getattr(model, "row_lora", None)
    max_rank = padded_rank(max_rank)
    if done is not None:
        if done.rows.max_loras != max_loras or done.max_rank != max_rank:
            raise ValueError(f"the model already carries per-row LoRA stacks for {done.rows.max_loras} adapters of "
                             f"rank {done.max_rank}; asked for {max_loras} of rank {max_rank}")
        return done
    cfg = model.config
    out = RowLora(LoraRows(max_loras, cfg.num_attention_heads), max_rank)
    dtype = model.lm_head.weight.dtype          # the activations' (an FP8 base's stacks are not FP8)
    for i, layer in enumerate(model.model.layers):
        for name, mod in layer.named_modules(prefix=f"model.layers.{i}"):
            if type(mod) in (nn.Linear, Fp8Linear):
                mod.__class__ = LoraLinear if type(mod) is nn.Linear else LoraFp8Linear
                new = dict(device=mod.weight.device, dtype=dtype)
                mod.register_buffer("lora_a", torch.zeros(max_loras, max_rank, mod.in_features, **new),
                                    persistent=False)
                mod.register_buffer("lora_b", torch.zeros(max_loras, mod.out_features, max_rank, **new),
                                    persistent=False)
                object.__setattr__(mod, "rows", out.rows)
                out.stacks[f"{name}.weight"] = (mod.lora_a, mod.lora_b, 1)
        if isinstance(layer.mlp, MoE):
            d = RowLoraDispatch(layer.mlp, out.rows, max_rank, dtype)
            layer.mlp.dispatch = d
            for w, (a, b) in d.stacks.items():
                key = f"model.layers.{i}.mlp.experts.{w}"
                if d.remote:                    # the expert shards hold this layer's stacks
                    out.remote[key] = (layer.mlp.layer, w)
                    continue
                out.stacks[key] = (a, b, layer.mlp.experts.count)
                out.expert_ids[key] = layer.mlp.experts.expert_ids
    object.__setattr__(model, "row_lora", out)
    return out
