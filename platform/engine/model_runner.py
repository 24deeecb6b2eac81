"""Runs the model for one scheduled batch: owns the paged latent cache tensors and builds the flat batch.

Turns a list of (sequence, chunk) into flat token ids, positions, cache slots and block tables, runs the main
model's cached forward, and runs the MTP module over the positions whose next token is known. Knows nothing of
sampling or scheduling policy.
"""
from __future__ import annotations

import torch

from raymoe.platform.engine.compiled_decode import CompiledDecode
from raymoe.platform.engine.cuda_graphs import DecodeGraphs
from raymoe.platform.engine.uniform_batch import forward_with_adapters
from raymoe.platform.model import DeepseekV3ForCausalLM, PagedAttention


class ModelRunner:
    def __init__(self, model: DeepseekV3ForCausalLM, num_blocks: int, block_size: int, use_mtp: bool,
                 graph_sizes: list[int] | None = None, max_model_len: int = 131072,
                 compile_query_lens: set[int] | None = None, uniform_query_lens: set[int] | None = None,
                 piecewise_graphs: bool = False) -> None:
        # graph_sizes: CUDA-graph batch sizes (None: eager); compile_query_lens: torch.compile the CPU steps with
        # these query lengths (None: eager); uniform_query_lens: the query lengths graphs are captured for;
        # piecewise_graphs: with remote experts, graph the segments between exchanges (else such steps run eager)
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size = block_size
        cfg = model.config
        n_layers = model.num_cache_layers if use_mtp else cfg.num_hidden_layers
        # one extra block at the end: the scratch block padding rows of a CUDA graph write into
        self.caches = [torch.zeros(num_blocks + 1, block_size, cfg.latent_dim, dtype=self.dtype, device=self.device)
                       for _ in range(n_layers)]
        self.graphs = None
        if graph_sizes and DecodeGraphs.supported(model, piecewise_graphs):
            self.graphs = DecodeGraphs(model, self.caches, block_size, graph_sizes, scratch_block=num_blocks,
                                       max_blocks=-(-max_model_len // block_size), query_lens=uniform_query_lens,
                                       piecewise=piecewise_graphs)
        self.compiled = None
        if compile_query_lens and CompiledDecode.supported(model):
            self.compiled = CompiledDecode(model, self.caches, block_size, compile_query_lens)
        # the fast path of uniform steps (B sequences x q tokens), if any: graphs on CUDA, compiled on the CPU;
        # its run / run_mtp return None when it cannot serve the step after all
        self.uniform: DecodeGraphs | CompiledDecode | None = self.graphs or self.compiled

    @staticmethod
    def cache_bytes_per_block(model: DeepseekV3ForCausalLM, block_size: int, use_mtp: bool, dtype: torch.dtype) -> int:
        cfg = model.config
        layers = model.num_cache_layers if use_mtp else cfg.num_hidden_layers
        return layers * block_size * cfg.latent_dim * torch.empty((), dtype=dtype).element_size()

    def _meta(self, tables: list[list[int]], starts: list[int], counts: list[int]) -> tuple[torch.Tensor, PagedAttention]:
        """Positions and attention metadata for rows: sequence b computes positions starts[b]..+counts[b]."""
        bs = self.block_size
        positions, slots, qs = [], [], [0]
        for table, s, n in zip(tables, starts, counts):
            for p in range(s, s + n):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            qs.append(qs[-1] + n)
        width = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=self.device)
        meta = PagedAttention(slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
                              block_tables=bt, query_start=qs, seq_lens=[s + n for s, n in zip(starts, counts)],
                              block_size=bs)
        return torch.tensor(positions, dtype=torch.long, device=self.device), meta

    @torch.inference_mode()
    def forward(self, tokens: list[list[int]], tables: list[list[int]], starts: list[int],
                lora: list[int] | None = None) -> torch.Tensor:
        # tokens[b]: the ids sequence b computes, at positions starts[b]..; lora[b]: its adapter slot (-1: base;
        # None: no adapter in the batch) -> final hidden [sum(len), H]
        if self.uniform is not None and self.uniform.can_run(tokens):
            hidden = self.uniform.run(tokens, tables, starts, lora)
            if hidden is not None:
                return hidden
        positions, meta = self._meta(tables, starts, [len(t) for t in tokens])
        ids = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long, device=self.device)
        if lora is None:
            return self.model.forward_cached(ids, positions, self.caches, meta)
        slots = torch.tensor([s for s, t in zip(lora, tokens) for _ in t], dtype=torch.long, device=self.device)
        return forward_with_adapters(self.model, slots, ids, positions, self.caches, meta)

    @torch.inference_mode()
    def mtp(self, hidden: torch.Tensor, next_ids: list[list[int]], tables: list[list[int]],
            starts: list[int]) -> torch.Tensor:
        # hidden: [sum(len), H] main (or previous MTP) hidden at those positions; next_ids[b]: the token after
        # each position -> MTP hidden [sum(len), H] (logits via model.compute_logits)
        if self.uniform is not None and self.uniform.can_run(next_ids):
            out = self.uniform.run_mtp(hidden, next_ids, tables, starts)
            if out is not None:
                return out
        positions, meta = self._meta(tables, starts, [len(t) for t in next_ids])
        ids = torch.tensor([t for seq in next_ids for t in seq], dtype=torch.long, device=self.device)
        return self.model.mtp_forward_cached(hidden, ids, positions, self.caches, meta)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden).float()
