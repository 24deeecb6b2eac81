"""Uniform steps (B sequences computing q tokens each: decode, MTP verification or drafting): their inputs as host
tensors, optionally padded to a fixed batch and table width for a captured CUDA graph, and the step itself.

Padding rows compute q tokens at positions 0..q-1 of `pad_block` (a scratch block no sequence owns) and attend only
to those; padding table columns point at `pad_block` too and lie past every length, so they are masked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.platform.model import DeepseekV3ForCausalLM, PagedAttention


@dataclass
class UniformInputs:
    ids: torch.Tensor        # [R * q] long
    positions: torch.Tensor  # [R * q] long
    slots: torch.Tensor      # [R * q] long: flat cache slot of each new token
    tables: torch.Tensor     # [R, W] long
    lens: torch.Tensor       # [R] long: context length after this step

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.ids, self.positions, self.slots, self.tables, self.lens


def uniform_inputs(tokens: list[list[int]], tables: list[list[int]], starts: list[int], block_size: int,
                   rows: int | None = None, width: int | None = None, pad_block: int = 0) -> UniformInputs:
    """tokens[b]: the q ids sequence b computes at positions starts[b]..; rows/width: pad to R sequences and W
    table columns (default: exactly B and the widest table)."""
    B, q = len(tokens), len(tokens[0])
    R = rows or B
    W = width or max(len(t) for t in tables)
    table = torch.full((R, W), pad_block, dtype=torch.long)
    for r, t in enumerate(tables):
        table[r, :len(t)] = torch.tensor(t, dtype=torch.long)
    first = torch.zeros(R, dtype=torch.long)
    first[:B] = torch.tensor(starts, dtype=torch.long)
    pos = (first[:, None] + torch.arange(q)).reshape(-1)                         # [R * q]
    block = table.repeat_interleave(q, dim=0).gather(1, (pos // block_size)[:, None]).squeeze(1)
    ids = torch.zeros(R * q, dtype=torch.long)
    ids[:B * q] = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long)
    return UniformInputs(ids, pos, block * block_size + pos % block_size, table, first + q)


def run_uniform(model: DeepseekV3ForCausalLM, caches: list[torch.Tensor], block_size: int, query_len: int,
                ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                lens: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """One uniform step over device tensors: the main model, or (with `hidden`, what it continues from) the MTP
    module. What a CUDA graph captures and what torch.compile traces."""
    # ids, positions, slots: [B * q]; tables: [B, W]; lens: [B]; hidden: [B * q, H] -> hidden [B * q, H]
    meta = PagedAttention.uniform(slots, tables, lens, query_len, block_size)
    if hidden is None:
        return model.forward_cached(ids, positions, caches, meta)
    return model.mtp_forward_cached(hidden, ids, positions, caches, meta)
