"""A Sequence: one stream of tokens the engine generates (a request with n > 1 owns n of them).

Holds the token ids, how many of them the cache already holds, the block table, the sampling state (a private
torch.Generator when the request has a seed, the grammar matcher when its output is constrained) and the MTP draft
waiting for verification. Scheduling and cache
policy live elsewhere.
"""
from __future__ import annotations

import enum
import itertools
from collections import Counter

import torch

from raymoe.platform.config import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, index: int = 0) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index                     # which of the request's n choices
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.status = Status.WAITING
        self.num_computed_tokens = 0           # tokens whose latents are in the cache (valid)
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        self.draft_ids: list[int] = []         # MTP drafts for the positions after the last token
        self.draft_probs: torch.Tensor | None = None   # [k, vocab] draft distributions (sampled requests)
        self.spec_proposed = 0
        self.spec_accepted = 0
        self.num_preemptions = 0
        self.output_counts: Counter[int] = Counter()
        self.adapter: str | None = params.adapter
        self.adapter_key = 0                   # the adapter's load id (keys prefix-cache blocks); 0: base model
        self.lora_slot = -1                    # device slot of its adapter while running (-1: none held)
        self.generator: torch.Generator | None = None
        self.grammar = None                    # GrammarState (engine/grammar.py) of a constrained request
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + index)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append(self, token: int) -> None:
        self.token_ids.append(token)
        self.output_counts[token] += 1

    def drop_last(self, n: int) -> None:
        """Forget the last n tokens (a stop string ended the output before them)."""
        for t in self.token_ids[len(self.token_ids) - n:]:
            self.output_counts[t] -= 1
        del self.token_ids[len(self.token_ids) - n:]

    def reset_for_recompute(self) -> None:
        """Preempted: drop the cache; the prompt and the tokens generated so far are recomputed later."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.draft_ids = []
        self.draft_probs = None
        self.status = Status.WAITING
        self.num_preemptions += 1
