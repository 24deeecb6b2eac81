"""CUDA graphs of the decode forward, one per (batch size, context bucket), replayed with static buffers.

A decode step of a small batch is dominated by kernel launches; replaying a captured graph removes them. Each
graph reads its inputs from static buffers (token ids, positions, cache slots, block tables, lengths) and writes
the final hidden states into a static output. Batches are padded up to the next captured size: padding rows write
their latent into a scratch block that no sequence owns and attend only to it. Context buckets (block-table widths)
are powers of two, so a graph gathers at most twice the blocks it needs. Graphs are captured lazily.
"""
from __future__ import annotations

import torch

from raymoe.platform.model import DeepseekV3ForCausalLM, PagedAttention


class DecodeGraphs:
    def __init__(self, model: DeepseekV3ForCausalLM, caches: list[torch.Tensor], block_size: int,
                 sizes: list[int], scratch_block: int, max_blocks: int) -> None:
        self.model, self.caches, self.bs = model, caches, block_size
        self.sizes = sorted(sizes)
        self.scratch = scratch_block
        self.max_blocks = max_blocks
        self.device = caches[0].device
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.pool = None

    @staticmethod
    def supported(model: DeepseekV3ForCausalLM) -> bool:
        p = next(model.parameters())
        return p.is_cuda and p.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")

    def can_run(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def _bucket(self, blocks: int) -> int:
        w = 8
        while w < blocks:
            w *= 2
        return min(w, self.max_blocks)

    def _capture(self, B: int, W: int):
        dev = self.device
        buf = {"ids": torch.zeros(B, dtype=torch.long, device=dev),
               "pos": torch.zeros(B, dtype=torch.long, device=dev),
               "slots": torch.full((B,), self.scratch * self.bs, dtype=torch.long, device=dev),
               "tables": torch.full((B, W), self.scratch, dtype=torch.long, device=dev),
               "lens": torch.ones(B, dtype=torch.long, device=dev)}
        meta = PagedAttention(slot_mapping=buf["slots"], block_tables=buf["tables"], query_start=list(range(B + 1)),
                              seq_lens=[1] * B, block_size=self.bs, seq_lens_t=buf["lens"])

        def run():
            return self.model.forward_cached(buf["ids"], buf["pos"], self.caches, meta)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        meta._decode = None                 # per-batch derived indices must be recomputed inside the graph
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            buf["out"] = run()
        self.pool = graph.pool()
        return graph, buf

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            lens: list[int]) -> torch.Tensor:
        """Decode one token for each of len(ids) sequences -> final hidden states [len(ids), H]."""
        b = len(ids)
        B = next(s for s in self.sizes if s >= b)
        W = self._bucket(max(len(t) for t in tables))
        key = (B, W)
        if key not in self.graphs:
            self.graphs[key] = self._capture(B, W)
        graph, buf = self.graphs[key]
        pad = B - b
        host = torch.empty(5, B, dtype=torch.long)
        host[0, :b], host[1, :b], host[2, :b], host[4, :b] = (torch.tensor(ids), torch.tensor(positions),
                                                              torch.tensor(slots), torch.tensor(lens))
        if pad:
            host[0, b:], host[1, b:], host[2, b:], host[4, b:] = 0, 0, self.scratch * self.bs, 1
        table = torch.full((B, W), self.scratch, dtype=torch.long)
        for r, t in enumerate(tables):
            table[r, :len(t)] = torch.tensor(t)
        buf["ids"].copy_(host[0], non_blocking=True)
        buf["pos"].copy_(host[1], non_blocking=True)
        buf["slots"].copy_(host[2], non_blocking=True)
        buf["lens"].copy_(host[4], non_blocking=True)
        buf["tables"].copy_(table, non_blocking=True)
        graph.replay()
        return buf["out"][:b]
