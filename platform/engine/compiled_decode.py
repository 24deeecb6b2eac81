"""The CPU counterpart of CUDA graphs: decode, MTP-verification and MTP-drafting steps run through torch.compile.

A decode step of a small model on the CPU is mostly Python and per-op dispatch overhead (hundreds of small ops
across the layers); Inductor fuses the elementwise work into a few C++ loops and calls the GEMMs directly. The
compiled step takes device tensors only (token ids, positions, cache slots, block tables, lengths) and describes
the batch with `PagedAttention.uniform`, so neither the batch size nor the context width is baked into the graph:
after the first steps there are a few graphs (a single sequence, a few, many) per query length (1 for decode,
k + 1 for MTP verification), and the same for the MTP module. The caches are updated in place inside the graph.
Compilation happens at first use (tens of seconds on two cores, cached on disk by Inductor for later processes);
if it fails (no C++ compiler, say), the runner logs why and stays eager.
"""
from __future__ import annotations

import logging

import torch

from raymoe.platform.engine.uniform_batch import run_uniform, uniform_inputs
from raymoe.platform.model import DeepseekV3ForCausalLM
from raymoe.platform.model.moe import STATIC_PATHS, ExpertDispatch, ExpertLora, RoutedExperts
from raymoe.platform.model.multi_lora import RowLoraDispatch

log = logging.getLogger(__name__)

# Routed experts stay eager inside the compiled step: their CPU paths sort rows by expert into data-dependent
# shapes, which would break the graph. They run behind an opaque custom op that the compiler only sees as
# "[N, H] in, [N, H] out"; `handle` picks the layer's expert computation.
_EXPERTS: dict[int, object] = {}


@torch.library.custom_op("raymoe::eager_experts", mutates_args=())
def eager_experts(handle: int, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                  slots: torch.Tensor | None, lora: list[torch.Tensor]) -> torch.Tensor:
    # x: [N, H]; topk_ids, topk_w: [N, k] -> routed output [N, H]
    # per-row LoRA: slots [N] (adapter slot of each token), lora: [a, b] stacks per weight of _LORA_WEIGHTS
    factors = None
    if slots is not None:
        factors = {n: ExpertLora(lora[2 * i], lora[2 * i + 1], 1.0, slots) for i, n in enumerate(_LORA_WEIGHTS)}
    return _EXPERTS[handle](layer, x, topk_ids, topk_w, factors)


@eager_experts.register_fake
def _(handle: int, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
      slots: torch.Tensor | None, lora: list[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(x)


_LORA_WEIGHTS = ("gate_up_proj", "down_proj")


class _OpaqueDispatch(ExpertDispatch):
    """An MoE dispatch for the compiled step, wrapping the layer's dispatch (`inner`; None: its local experts).
    Local experts whose inference path has static shapes (`RoutedExperts.inference_path` in STATIC_PATHS: a few
    pairs gathered, or every expert dense) are traced, per-row LoRA factors (`multi_lora`) included: they fuse;
    other batches or any other dispatch run whole (send and wait) behind `eager_experts` (per-row LoRA's slots and
    stacks travel to it as tensor arguments)."""

    def __init__(self, experts: RoutedExperts, inner: ExpertDispatch | None) -> None:
        self.experts, self.inner = experts, inner
        self.remote = inner is not None and inner.remote
        self.handle = len(_EXPERTS)
        _EXPERTS[self.handle] = inner or (lambda _layer, x, i, w, lora=None: experts(x, i, w, lora=lora))

    def send(self, layer, hidden, topk_ids, topk_w, lora=None):
        if lora:
            if set(lora) != set(_LORA_WEIGHTS) or any(f.slots is None or f.scale != 1.0 for f in lora.values()):
                raise ValueError("the compiled CPU step takes per-row LoRA stacks (multi_lora) only")
            if self.inner is None and self.experts.inference_path(*topk_ids.shape, per_row_lora=True) in STATIC_PATHS:
                return self.experts(hidden, topk_ids, topk_w, lora=lora)        # traced, the pairs' factors too
            stacks = [t for n in _LORA_WEIGHTS for t in (lora[n].a, lora[n].b)]
            return eager_experts(self.handle, layer, hidden, topk_ids, topk_w, lora["down_proj"].slots, stacks)
        if self.inner is None and self.experts.inference_path(*topk_ids.shape) in STATIC_PATHS:
            return self.experts(hidden, topk_ids, topk_w)
        return eager_experts(self.handle, layer, hidden, topk_ids, topk_w, None, [])

    def wait(self, pending):
        return pending


class CompiledDecode:
    def __init__(self, model: DeepseekV3ForCausalLM, caches: list[torch.Tensor], block_size: int,
                 query_lens: set[int]) -> None:
        self.model, self.caches, self.bs = model, caches, block_size
        self.query_lens = query_lens
        self.failed: str | None = None
        self.top_k = model.config.num_experts_per_tok
        self.seen: set[tuple] = set()
        for moe in model.moe_layers():
            # per-row LoRA stays outside (it hands its stacks and slots to the opaque op as tensors)
            outer = moe.dispatch if isinstance(moe.dispatch, RowLoraDispatch) else None
            inner = outer.inner if outer is not None else moe.dispatch
            if not isinstance(inner, _OpaqueDispatch):
                inner = _OpaqueDispatch(moe.experts, inner)
            if outer is not None:
                outer.inner = inner
            else:
                moe.dispatch = inner
        # Dynamo keeps at most cache_size_limit graphs per function and then runs it eagerly without a word; every
        # engine in a process adds its own few graphs (the guards hold `self`), so leave room for many engines
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # freezing: meant to make the weights constants of the graph, prepacked for oneDNN's CPU GEMMs. With torch
        # 2.13 this option is not applied (the generated code calls plain mm on weight inputs; setting
        # torch._inductor.config.freezing while compiling does pack them: ~3% of a batch-8 step on the tiny vllm
        # preset, and a third early greedy parting in test_cpu_bf16, so not switched on yet)
        self._step = torch.compile(self._forward, dynamic=None, options={"freezing": True})
        self._mtp_step = torch.compile(self._mtp_forward, dynamic=None, options={"freezing": True})

    @staticmethod
    def supported(model: DeepseekV3ForCausalLM) -> bool:
        return next(model.parameters()).device.type == "cpu"

    def can_run(self, tokens: list[list[int]]) -> bool:
        q = len(tokens[0])
        return self.failed is None and q in self.query_lens and all(len(t) == q for t in tokens)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, query_len: int, lora: torch.Tensor | None = None) -> torch.Tensor:
        return run_uniform(self.model, self.caches, self.bs, query_len, ids, positions, slots, tables, lens,
                           lora=lora)

    def _mtp_forward(self, hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                     tables: torch.Tensor, lens: torch.Tensor, query_len: int) -> torch.Tensor:
        return run_uniform(self.model, self.caches, self.bs, query_len, ids, positions, slots, tables, lens, hidden)

    def run(self, tokens: list[list[int]], tables: list[list[int]], starts: list[int],
            lora: list[int] | None = None) -> torch.Tensor | None:
        """The step for B sequences computing q tokens each at positions starts[b].. (lora[b]: sequence b's adapter
        slot) -> hidden [B * q, H], or None when compilation failed (the caller runs the eager model)."""
        return self._call("main", self._step, None, tokens, tables, starts, lora)

    def run_mtp(self, hidden: torch.Tensor, next_ids: list[list[int]], tables: list[list[int]],
                starts: list[int]) -> torch.Tensor | None:
        """The MTP module over q positions of each of B sequences (next_ids[b]: the token after each) -> MTP
        hidden [B * q, H], or None when compilation failed."""
        return self._call("mtp", self._mtp_step, hidden, next_ids, tables, starts)

    def _paths(self, tokens: int) -> tuple[str, ...]:
        """The local experts' inference path of each MoE layer for a step of `tokens` rows: what tells the graphs
        of one query length apart, besides a batch of one."""
        return tuple(m.experts.inference_path(tokens, self.top_k) for m in self.model.moe_layers())

    def _call(self, which: str, fn, hidden: torch.Tensor | None, tokens: list[list[int]], tables: list[list[int]],
              starts: list[int], lora: list[int] | None = None) -> torch.Tensor | None:
        B, q = len(tokens), len(tokens[0])
        # width >= 2: a dimension of size 1 cannot stay symbolic
        inp = uniform_inputs(tokens, tables, starts, self.bs, width=max(2, max(len(t) for t in tables)), lora=lora)
        ids, pos, slots, table, lens = inp.tensors()
        args = (ids, pos, slots, table, lens) if hidden is None else (hidden, ids, pos, slots, table, lens)
        # symbolic batch and width (maybe_: sizes tied to each other, B * q rows for B sequences, stay legal)
        torch._dynamo.maybe_mark_dynamic(table, 1)
        if B > 1:
            for t in args + ((inp.lora,) if lora is not None else ()):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        # Once a shape class has a graph, evaluate only the guards that tell the existing graphs apart: the full
        # guard set (every parameter of the model) costs a quarter of a millisecond per step.
        key = (which, q, B == 1, self._paths(B * q), lora is not None)
        extra = {"lora": inp.lora} if lora is not None else {}
        try:
            if key in self.seen:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return fn(*args, q, **extra)
            out = fn(*args, q, **extra)
            self.seen.add(key)
            return out
        except Exception as e:                                  # noqa: BLE001 - any compiler failure: stay eager
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("torch.compile of the CPU decode step failed, running eager from now on: %s", self.failed)
            return None
