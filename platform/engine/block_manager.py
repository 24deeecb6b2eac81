"""The paged latent cache's bookkeeping: fixed-size blocks, a free list, reference counts, prefix caching.

Owns which block holds which tokens; never touches cache tensors. A full block is identified by a hash chained
over all tokens up to its end (hash(parent_hash, its tokens)), seeded with the sequence's adapter (its load id: the
same tokens under another adapter, or under a reloaded one, have other latents), so two sequences sharing a system
prompt and an adapter share its blocks. Freed blocks keep their hash until they are reused, so a later request can still hit them.
"""
from __future__ import annotations

from collections import OrderedDict

from raymoe.platform.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # free blocks in LRU order; cached-but-free blocks can be revived by a prefix hit
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_hits = 0
        self.prefix_queries = 0

    # ---- queries -------------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _chain(self, tokens: list[int], adapter_key: int = 0) -> list[int]:
        """Hashes of the full blocks of `tokens` computed with adapter `adapter_key` (0: the base model)."""
        hashes, h = [], hash(("adapter", adapter_key)) if adapter_key else 0
        for i in range(len(tokens) // self.block_size):
            h = hash((h, tuple(tokens[i * self.block_size:(i + 1) * self.block_size])))
            hashes.append(h)
        return hashes

    # ---- allocation ----------------------------------------------------------------------------------------------
    def _take(self, block: int) -> None:
        if self.ref[block] == 0:
            self.free.pop(block, None)
        self.ref[block] += 1

    def _fresh(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None and self.hash_to_block.get(old) == block:
            del self.hash_to_block[old]
        self.block_hash[block] = None
        self.ref[block] = 1
        return block

    def allocate_prompt(self, seq: Sequence, budget: int) -> bool:
        """First allocation of a waiting sequence: its cached prefix plus up to `budget` more tokens.

        Reuses cached full blocks of the sequence's tokens (never the block holding its last token, which must be
        recomputed to produce logits). Returns False, allocating nothing, when the free blocks do not suffice.
        """
        assert not seq.block_table
        hits: list[int] = []
        if self.prefix_caching:
            usable = (len(seq.token_ids) - 1) // self.block_size
            for h in self._chain(seq.token_ids, seq.adapter_key)[:usable]:
                b = self.hash_to_block.get(h)
                if b is None:
                    break
                hits.append(b)
            self.prefix_queries += 1
        cached = len(hits) * self.block_size
        need = self.blocks_needed(min(len(seq), cached + budget)) - len(hits)
        revived = sum(1 for b in hits if self.ref[b] == 0)
        if need + revived > self.num_free:
            return False
        for b in hits:
            self._take(b)
        seq.block_table = hits + [self._fresh() for _ in range(need)]
        seq.num_computed_tokens = cached
        if hits:
            self.prefix_hits += 1
        return True

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens` tokens. False (and no change) if out of blocks."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        seq.block_table += [self._fresh() for _ in range(need)]
        return True

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of the blocks whose tokens are now all computed (for later prefix hits)."""
        if not self.prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        for i, h in enumerate(self._chain(seq.token_ids[:full * self.block_size], seq.adapter_key)):
            b = seq.block_table[i]
            if self.block_hash[b] is None and h not in self.hash_to_block:
                self.block_hash[b] = h
                self.hash_to_block[h] = b

    def free_seq(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None          # most recently freed last: evicted last
        seq.block_table = []

    def check_no_leak(self) -> None:
        assert self.num_free == self.num_blocks and not any(self.ref), "blocks still referenced"
