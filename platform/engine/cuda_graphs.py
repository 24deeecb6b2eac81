"""CUDA graphs of uniform steps, one per (module, query length, batch size, context bucket), replayed with static
buffers: decode (q = 1), MTP verification (q = k + 1) and MTP drafting (the MTP module over q positions).

A step of a small batch is dominated by kernel launches; replaying a captured graph removes them. Each graph reads
its inputs from static buffers (token ids, positions, cache slots, block tables, lengths, and for the MTP module the
hidden states it continues from) and writes the hidden states into a static output. Per-row adapters (multi_lora) add
the slot of each row as one more static input, in graphs of their own (a batch without adapters replays one without
LoRA work). Batches are padded up to the next captured size: padding rows write their latents into a scratch block
that no sequence owns and attend only to it. Context buckets (block-table widths) are powers of two, so a graph
gathers at most twice the blocks it needs. Graphs are captured lazily.

A model whose routed experts are remote (expert parallelism) is captured piecewise when `piecewise` is set: the
segments between its MoE exchanges are graphs and the exchanges run eagerly between them (`piecewise_graphs`).
Whole-step capture refuses such a model: a remote call is never captured.
"""
from __future__ import annotations

import torch

from raymoe.platform.engine.piecewise_graphs import PiecewiseGraph
from raymoe.platform.engine.uniform_batch import run_uniform, uniform_inputs
from raymoe.platform.model import DeepseekV3ForCausalLM

_INPUTS = ("ids", "pos", "slots", "tables", "lens")


class DecodeGraphs:
    def __init__(self, model: DeepseekV3ForCausalLM, caches: list[torch.Tensor], block_size: int,
                 sizes: list[int], scratch_block: int, max_blocks: int, query_lens: set[int] | None = None,
                 piecewise: bool = False) -> None:
        self.model, self.caches, self.bs = model, caches, block_size
        self.piecewise = piecewise            # remote experts: graph the segments between exchanges
        self.sizes = sorted(sizes)
        self.scratch = scratch_block
        self.max_blocks = max_blocks
        self.query_lens = query_lens or {1}
        self.device = caches[0].device
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph | PiecewiseGraph, dict[str, torch.Tensor]]] = {}
        self.pool = None

    @staticmethod
    def supported(model: DeepseekV3ForCausalLM, piecewise: bool = False) -> bool:
        p = next(model.parameters())
        return (p.is_cuda and p.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
                and (piecewise or not model.remote_experts()))   # a remote call is never captured

    def can_run(self, tokens: list[list[int]]) -> bool:
        q = len(tokens[0])
        return (len(tokens) <= self.sizes[-1] and q in self.query_lens and q <= self.bs
                and all(len(t) == q for t in tokens))

    def _bucket(self, blocks: int) -> int:
        w = 8
        while w < blocks:
            w *= 2
        return min(w, self.max_blocks)

    def _capture(self, mtp: bool, q: int, B: int, W: int, lora: bool):
        remote = self.model.remote_experts()
        if remote and not self.piecewise:
            raise RuntimeError("refusing to capture a CUDA graph over remote expert dispatches")
        init = uniform_inputs([[0] * q], [[self.scratch]], [0], self.bs, rows=B, width=W, pad_block=self.scratch,
                              lora=[-1] if lora else None)
        buf = {name: t.to(self.device) for name, t in zip(_INPUTS, init.tensors())}
        if mtp:
            buf["hidden"] = torch.zeros(B * q, self.model.config.hidden_size, dtype=self.caches[0].dtype,
                                        device=self.device)
        if lora:                                 # per-row adapters: the slot of each row, a static input too
            buf["lora"] = init.lora.to(self.device)

        def run():
            return run_uniform(self.model, self.caches, self.bs, q, *(buf[name] for name in _INPUTS),
                               hidden=buf.get("hidden"), lora=buf.get("lora"))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        if remote:
            graph = PiecewiseGraph(self.model, self.pool)
            buf["out"] = graph.capture(run)
            self.pool = graph.pool
            return graph, buf
        graph = torch.cuda.CUDAGraph()          # (a fresh PagedAttention per run: its indices are built inside)
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            buf["out"] = run()
        self.pool = graph.pool()
        return graph, buf

    def _replay(self, mtp: bool, hidden: torch.Tensor | None, tokens: list[list[int]], tables: list[list[int]],
                starts: list[int], lora: list[int] | None = None) -> torch.Tensor:
        b, q = len(tokens), len(tokens[0])
        B = next(s for s in self.sizes if s >= b)
        W = self._bucket(max(len(t) for t in tables))
        key = (mtp, q, B, W, lora is not None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(mtp, q, B, W, lora is not None)
        graph, buf = self.graphs[key]
        host = uniform_inputs(tokens, tables, starts, self.bs, rows=B, width=W, pad_block=self.scratch, lora=lora)
        for name, t in zip(_INPUTS, host.tensors()):
            buf[name].copy_(t, non_blocking=True)
        if lora is not None:
            buf["lora"].copy_(host.lora, non_blocking=True)
        if hidden is not None:
            buf["hidden"][:b * q].copy_(hidden)
        graph.replay()
        return buf["out"][:b * q]

    def run(self, tokens: list[list[int]], tables: list[list[int]], starts: list[int],
            lora: list[int] | None = None) -> torch.Tensor:
        """The main model for B sequences computing q tokens each at positions starts[b].. (lora[b]: sequence b's
        adapter slot) -> hidden [B * q, H]."""
        return self._replay(False, None, tokens, tables, starts, lora)

    def run_mtp(self, hidden: torch.Tensor, next_ids: list[list[int]], tables: list[list[int]],
                starts: list[int]) -> torch.Tensor:
        """The MTP module over q positions of each of B sequences -> MTP hidden [B * q, H]."""
        return self._replay(True, hidden, next_ids, tables, starts)
