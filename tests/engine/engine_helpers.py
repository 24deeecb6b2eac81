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


def greedy_margins(model, prompt: list[int], n: int) -> tuple[list[int], list[float], list[float]]:
    """The no-cache greedy reference with, per step, the top-1 - top-2 logit margin and the chosen token's logprob:
    where a lower-precision path may pick the other token (margin small) and how sure the reference was."""
    ids = list(prompt)
    device = next(model.parameters()).device
    toks, margins, lps = [], [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids], device=device))[0, -1].float()
            top = logits.topk(2)
            toks.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            lps.append(float(torch.log_softmax(logits, -1)[toks[-1]]))
            ids.append(toks[-1])
    return toks, margins, lps


def prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in lengths]


# A fixed cycle of 16 tokens over 8 ids, each id twice: the successor of an id depends on the id before it too,
# so a model that predicts the cycle needs attention (and its cache), not just the last token.
CYCLE = [402, 406, 405, 401, 401, 402, 403, 403, 405, 407, 400, 404, 400, 406, 407, 404]


def cycle_text(start: int, n: int) -> list[int]:
    return [CYCLE[(start + i) % len(CYCLE)] for i in range(n)]


def train_on_cycle(model, steps: int = 60, seed: int = 0) -> tuple[float, float]:
    """Train main head and MTP module (`mode: full` with the MTP loss, plain torch, one process) on windows of
    CYCLE, so MTP drafts are mostly accepted. Returns the last (main, MTP) cross-entropies."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    cyc = torch.tensor(CYCLE)
    model.train()
    for _ in range(steps):
        ids = cyc[(torch.randint(0, len(CYCLE), (8, 1), generator=g) + torch.arange(48)) % len(CYCLE)]  # [8, 48]
        h = model.hidden_states(ids)                                                          # [8, 48, H]
        main = F.cross_entropy(model.lm_head(h[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        mtp = F.cross_entropy(model.mtp_logits(h[:, :-2], ids[:, 1:-1]).flatten(0, 1), ids[:, 2:].flatten())
        opt.zero_grad()
        (main + mtp).backward()
        opt.step()
    model.eval()
    return main.item(), mtp.item()
