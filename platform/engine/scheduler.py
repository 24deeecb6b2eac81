"""Continuous batching: which sequences run this step, and how many tokens each computes.

Each step has a token budget (max_num_batched_tokens). Running sequences go first: a decoding sequence needs 1
token plus its MTP drafts, a sequence mid-prefill takes a chunk of what the budget leaves. Waiting sequences then
join while budget, the sequence cap and free cache blocks allow (admission by KV capacity), so a 131,072-token
prompt is processed in chunks while other requests keep decoding. When a running sequence cannot get a block,
the most recently admitted running sequence is preempted (its cache freed, recomputed later) instead of failing.
A sequence with a LoRA adapter also needs a device slot for it (`AdapterPool.acquire`), pinned while it runs.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from raymoe.platform.config import EngineConfig
from raymoe.platform.engine.adapters import AdapterPool
from raymoe.platform.engine.block_manager import BlockManager
from raymoe.platform.engine.sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int        # tokens computed this step (the chunk, or 1 + drafts when decoding)
    num_drafts: int        # of those, MTP drafts under verification

    @property
    def reaches_end(self) -> bool:
        return self.seq.num_computed_tokens + self.num_tokens - self.num_drafts >= len(self.seq)


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager, adapters: AdapterPool | None = None) -> None:
        self.cfg, self.blocks, self.adapters = cfg, blocks, adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove_finished(self) -> list[Sequence]:
        done = [s for s in self.running if s.is_finished]
        for s in done:
            self.blocks.free_seq(s)
            self._unpin(s)
        self.running = [s for s in self.running if not s.is_finished]
        return done

    def abort(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free_seq(seq)
        self._unpin(seq)

    def _unpin(self, seq: Sequence) -> None:
        """Let go of the device slot of the sequence's adapter (an unpinned slot may be evicted)."""
        if seq.lora_slot >= 0:
            self.adapters.release(seq.lora_slot)
            seq.lora_slot = -1

    def _preempt(self, victim: Sequence) -> None:
        self.running.remove(victim)
        self.blocks.free_seq(victim)
        self._unpin(victim)
        victim.reset_for_recompute()
        self.waiting.appendleft(victim)
        self.num_preemptions += 1

    def schedule(self) -> list[Scheduled]:
        budget = self.cfg.max_num_batched_tokens
        out: list[Scheduled] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            drafts = len(seq.draft_ids)
            n = min(seq.num_uncomputed, budget) if seq.num_uncomputed > 1 else 1 + drafts
            if n > budget:                    # no room for the drafts this step: verify none
                seq.draft_ids, seq.draft_probs, drafts, n = [], None, 0, 1
            if seq.num_uncomputed > 1:
                drafts = 0
            while not self.blocks.ensure(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                out.append(Scheduled(seq, n, drafts))
                budget -= n
                i += 1
                continue
            # seq itself was preempted; the loop index now points at the next sequence
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if not self.cfg.enable_chunked_prefill and seq.num_uncomputed > budget:
                if out:
                    break                     # whole prompt next step, when the budget is free
                budget = seq.num_uncomputed   # alone, in one piece
            if seq.adapter is not None:
                seq.lora_slot = self.adapters.acquire(seq.adapter)
                if seq.lora_slot is None:     # every adapter slot is pinned by running sequences of others
                    seq.lora_slot = -1
                    break
            if not self.blocks.allocate_prompt(seq, budget):
                self._unpin(seq)
                break                         # admission by KV-cache capacity
            n = min(seq.num_uncomputed, budget)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(Scheduled(seq, n, 0))
            budget -= n
        return out
