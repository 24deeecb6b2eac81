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


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[Counter[int]]) -> torch.Tensor:
    # logits: [R, V] fp32 -> penalised copy (presence/frequency on output tokens, repetition on prompt + output)
    if all(p.presence_penalty == 0 and p.frequency_penalty == 0 and p.repetition_penalty == 1 for p in params):
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
    # Greedy rows become one-hot on the argmax.
    logits = logits.float()
    probs = torch.empty_like(logits)
    for r, p in enumerate(params):
        row = logits[r]
        if p.greedy:
            probs[r] = torch.nn.functional.one_hot(row.argmax(), row.shape[0]).float()
            continue
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


def verify_drafts(target: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None, greedy: bool,
                  generator: torch.Generator | None, default: torch.Generator) -> list[int]:
    """Speculative verification of one sequence.

    target: [k + 1, V] processed target probabilities at the positions of the last token and each draft;
    drafts: k draft tokens; draft_probs: [k, V] the draft distributions (None for greedy).
    Returns the tokens to append: the accepted drafts, then one token from the target (a correction where a
    draft was rejected, else the bonus token). Standard rejection sampling: accept d with min(1, p(d) / q(d)),
    else draw from norm(max(0, p - q)); the result is distributed exactly as sampling from the target.
    """
    out: list[int] = []
    for j, d in enumerate(drafts):
        p = target[j]
        if greedy:
            if int(p.argmax()) != d:
                out.append(int(p.argmax()))
                return out
            out.append(d)
            continue
        q = draft_probs[j]
        if uniform(generator, default) * float(q[d]) <= float(p[d]):   # u < p/q, without dividing by zero
            out.append(d)
            continue
        residual = (p - q).clamp(min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else p
        out.append(draw(residual[None], [generator], default)[0])
        return out
    last = target[len(drafts)]
    out.append(int(last.argmax()) if greedy else draw(last[None], [generator], default)[0])
    return out
