"""Turn logits into tokens: penalties, temperature, top-k / top-p / min-p, seeded sampling, logprobs, and the
rejection sampling that verifies MTP drafts.

Every function works on rows (one row per position that needs a token) with per-row parameters, so one call
serves a whole batch of different requests. `processed_probs` is the one definition of a request's sampling
distribution: plain sampling draws from it, and speculative verification compares draft and target under it,
which is what makes speculative sampling follow exactly the same distribution.
"""
from __future__ import annotations

from collections import Counter

import torch

from raymoe.platform.config import SamplingParams


def needs_penalties(params: list[SamplingParams]) -> bool:
    return any(p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1 for p in params)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[Counter[int]]) -> torch.Tensor:
    # logits: [R, V] fp32 -> penalised copy (presence/frequency on output tokens, repetition on prompt + output)
    if not needs_penalties(params):
        return logits
    logits = logits.clone()
    for r, (p, prompt, counts) in enumerate(zip(params, prompts, outputs)):
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(prompt) | set(counts)), dtype=torch.long, device=logits.device)
            if seen.numel():
                v = logits[r, seen]
                logits[r, seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
            n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
            logits[r, ids] -= p.frequency_penalty * n + p.presence_penalty
    return logits


def processed_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    # logits: [R, V] (penalised) -> probabilities [R, V] fp32 after temperature, top-k, top-p, min-p.
    # Greedy rows become one-hot on the argmax (all of them in one op).
    logits = logits.float()
    probs = torch.empty_like(logits)
    greedy = [r for r, p in enumerate(params) if p.greedy]
    if greedy:
        rows = torch.tensor(greedy, device=logits.device)
        probs[rows] = torch.nn.functional.one_hot(logits[rows].argmax(-1), logits.shape[1]).float()
    for r, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[r]
        row = row / p.temperature
        if p.top_k and p.top_k < row.shape[0]:
            kth = row.topk(p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        pr = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sp, idx = pr.sort(descending=True)
            cum = sp.cumsum(0)
            drop = (cum - sp) >= p.top_p            # keep the smallest prefix whose mass reaches top_p
            sp = sp.masked_fill(drop, 0.0)
            pr = torch.zeros_like(pr).scatter_(0, idx, sp)
        if p.min_p > 0:
            pr = pr.masked_fill(pr < p.min_p * pr.max(), 0.0)
        probs[r] = pr / pr.sum()
    return probs


def draw(probs: torch.Tensor, generators: list[torch.Generator | None], default: torch.Generator) -> list[int]:
    # probs: [R, V] -> R token ids; each row uses its own generator when it has one (reproducible per request)
    out = []
    cpu = probs.float().cpu()
    for r in range(cpu.shape[0]):
        out.append(int(torch.multinomial(cpu[r], 1, generator=generators[r] or default)))
    return out


def uniform(generator: torch.Generator | None, default: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator or default))


def top_logprobs(logits: torch.Tensor, tokens: list[int], k: list[int | None]) -> list[dict | None]:
    # logits: [R, V] raw -> per row {"token": id, "logprob": lp, "top": [(id, lp), ...]} (None when not asked)
    if all(x is None for x in k):
        return [None] * len(tokens)
    lp = torch.log_softmax(logits.float(), dim=-1).cpu()
    res: list[dict | None] = []
    for r, (t, kk) in enumerate(zip(tokens, k)):
        if kk is None:
            res.append(None)
            continue
        top = lp[r].topk(kk) if kk else None
        res.append({"token": t, "logprob": float(lp[r, t]),
                    "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))})
    return res


def accept_greedy(drafts: list[int], target_argmax: list[int]) -> list[int]:
    """Greedy verification of one sequence on the host: the drafts up to the first that differs from the target's
    argmax, then the target's token there (or the bonus token after the last draft). target_argmax: k + 1 ids."""
    out: list[int] = []
    for d, t in zip(drafts, target_argmax):
        out.append(t)
        if d != t:
            return out
    out.append(target_argmax[len(drafts)])
    return out


def verify_drafts(target: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor,
                  generator: torch.Generator | None, default: torch.Generator) -> list[int]:
    """Speculative verification of one sampled sequence (greedy ones: `accept_greedy`).

    target: [k + 1, V] processed target probabilities at the positions of the last token and each draft;
    drafts: k draft tokens; draft_probs: [k, V] the draft distributions.
    Returns the tokens to append: the accepted drafts, then one token from the target (a correction where a
    draft was rejected, else the bonus token). Standard rejection sampling: accept d with min(1, p(d) / q(d)),
    else draw from norm(max(0, p - q)); the result is distributed exactly as sampling from the target.
    """
    out: list[int] = []
    for j, d in enumerate(drafts):
        p, q = target[j], draft_probs[j]
        if uniform(generator, default) * float(q[d]) <= float(p[d]):   # u < p/q, without dividing by zero
            out.append(d)
            continue
        residual = (p - q).clamp(min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else p
        out.append(draw(residual[None], [generator], default)[0])
        return out
    out.append(draw(target[len(drafts)][None], [generator], default)[0])
    return out
