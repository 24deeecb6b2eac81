"""Helpers shared by the engine tests: the no-cache greedy reference and deterministic prompts."""
from __future__ import annotations

import torch


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Argmax decoding with a full re-forward per token (no cache): the ground truth."""
    ids = torch.tensor(prompt, device=next(model.parameters()).device)[None]
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[0, -1].argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in lengths]
