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
    lora: torch.Tensor | None = None   # [R * q] long: adapter slot of each token (-1: base); None: no adapters

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.ids, self.positions, self.slots, self.tables, self.lens


def uniform_inputs(tokens: list[list[int]], tables: list[list[int]], starts: list[int], block_size: int,
                   rows: int | None = None, width: int | None = None, pad_block: int = 0,
                   lora: list[int] | None = None) -> UniformInputs:
    """tokens[b]: the q ids sequence b computes at positions starts[b]..; rows/width: pad to R sequences and W
    table columns (default: exactly B and the widest table); lora[b]: sequence b's adapter slot (padding: -1)."""
    B, q = len(tokens), len(tokens[0])
    R = rows or B
    W = width or max(len(t) for t in tables)
    # one host list per tensor, then one torch.tensor each (a tensor per row costs more than the rest of it)
    pad = [pad_block] * W
    table = torch.tensor([t + pad[len(t):] for t in tables] + [pad] * (R - B), dtype=torch.long)
    first = torch.tensor(starts + [0] * (R - B), dtype=torch.long)
    pos = (first[:, None] + torch.arange(q)).reshape(-1)                         # [R * q]
    block = table.repeat_interleave(q, dim=0).gather(1, (pos // block_size)[:, None]).squeeze(1)
    ids = torch.tensor([t for seq in tokens for t in seq] + [0] * ((R - B) * q), dtype=torch.long)
    slots = None
    if lora is not None:
        slots = torch.full((R, q), -1, dtype=torch.long)
        slots[:B] = torch.tensor(lora, dtype=torch.long)[:, None]
        slots = slots.reshape(-1)
    return UniformInputs(ids, pos, block * block_size + pos % block_size, table, first + q, slots)


def run_uniform(model: DeepseekV3ForCausalLM, caches: list[torch.Tensor], block_size: int, query_len: int,
                ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                lens: torch.Tensor, hidden: torch.Tensor | None = None, lora: torch.Tensor | None = None) -> torch.Tensor:
    """One uniform step over device tensors: the main model, or (with `hidden`, what it continues from) the MTP
    module. What a CUDA graph captures and what torch.compile traces. `lora`: the adapter slot of each token
    (multi_lora), bound for this forward only."""
    # ids, positions, slots, lora: [B * q]; tables: [B, W]; lens: [B]; hidden: [B * q, H] -> hidden [B * q, H]
    meta = PagedAttention.uniform(slots, tables, lens, query_len, block_size)
    if hidden is not None:
        return model.mtp_forward_cached(hidden, ids, positions, caches, meta)
    if lora is None:
        return model.forward_cached(ids, positions, caches, meta)
    return forward_with_adapters(model, lora, ids, positions, caches, meta)


def forward_with_adapters(model: DeepseekV3ForCausalLM, lora: torch.Tensor, *args) -> torch.Tensor:
    """model.forward_cached(*args) with per-row adapters: `lora` [N] the slot of each token (-1: base)."""
    rows = model.row_lora.rows
    rows.bind(lora)
    try:
        return model.forward_cached(*args)
    finally:
        rows.bind(None)
