"""Sampling parameters: validation, seeds, stops, penalties, logprobs, n > 1, and speculative verification."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from raymoe.platform.config import SamplingParams
from raymoe.platform.engine import RequestError
from raymoe.platform.engine.sampler import accept_greedy, processed_probs, verify_drafts
from engine_helpers import prompts


@pytest.mark.parametrize("kw, needle", [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
                                        ({"temperature": -0.1}, "temperature"), ({"top_p": 0}, "top_p"),
                                        ({"top_p": 1.01}, "top_p"), ({"n": 0}, "n")])
def test_bad_sampling_params(kw, needle):
    with pytest.raises(ValidationError, match=needle):
        SamplingParams(**kw)


def test_request_errors_before_any_work(make_engine):
    eng = make_engine(max_model_len=64)
    with pytest.raises(RequestError, match=r"prompt \(60 tokens\) plus max_tokens \(10\) is 70 tokens, more than "
                                           r"max_model_len \(64\)"):
        eng.add_request("x", list(range(3, 63)), SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.add_request("y", [5, 99999], SamplingParams())
    with pytest.raises(RequestError, match="empty"):
        eng.add_request("z", [], SamplingParams())
    assert not eng.has_unfinished() and eng.blocks.num_free == eng.blocks.num_blocks


def test_default_max_model_len_is_the_model_context(make_engine):
    assert make_engine().max_model_len == 131072


def test_seeded_sampling_is_reproducible_per_request(make_engine):
    (p,) = prompts(5, (12,))
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=123, ignore_eos=True)
    a = make_engine().generate([p], params)[0]["outputs"][0]["token_ids"]
    eng = make_engine()
    others = prompts(6, (7, 9))
    b = eng.generate([others[0], p, others[1]], [SamplingParams(temperature=1.0, max_tokens=12), params,
                                                  SamplingParams(temperature=0.7, max_tokens=5)])[1]
    assert b["outputs"][0]["token_ids"] == a
    c = make_engine().generate([p], params.model_copy(update={"seed": 124}))[0]["outputs"][0]["token_ids"]
    assert c != a


def test_n_choices_differ_and_stop_token_ids(make_engine):
    (p,) = prompts(7, (10,))
    out = make_engine().generate([p], SamplingParams(n=3, temperature=1.5, max_tokens=8, seed=1,
                                                     ignore_eos=True))[0]["outputs"]
    assert len(out) == 3 and len({tuple(o["token_ids"]) for o in out}) == 3
    first = out[0]["token_ids"]
    stopped = make_engine().generate([p], SamplingParams(n=1, temperature=1.5, max_tokens=8, seed=1, ignore_eos=True,
                                                         stop_token_ids=[first[2]]))[0]["outputs"][0]
    assert stopped["token_ids"] == first[:3] and stopped["finish_reason"] == "stop"


def test_stop_strings_truncate_text(make_engine):
    (p,) = prompts(8, (10,))
    full = make_engine().generate([p], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]["outputs"][0]
    text = full["text"]
    stop = text[5:8]
    assert len(stop) == 3 and text.find(stop) == 5
    got = make_engine().generate([p], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                     stop=[stop]))[0]["outputs"][0]
    assert got["text"] == text[:5] and got["finish_reason"] == "stop"


def test_penalties_and_logprobs(make_engine):
    (p,) = prompts(9, (6,))
    plain = make_engine().generate([p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                       logprobs=3))[0]["outputs"][0]
    lps = plain["logprobs"]
    assert len(lps) == 24 and all(len(x["top"]) == 3 for x in lps)
    assert all(x["token"] == x["top"][0][0] and abs(x["logprob"] - x["top"][0][1]) < 1e-6 for x in lps)
    assert all(x["logprob"] <= 0 for x in lps)
    pen = make_engine().generate([p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                     frequency_penalty=2.0, presence_penalty=2.0))[0]["outputs"][0]
    assert len(set(pen["token_ids"])) > len(set(plain["token_ids"]))
    rep = make_engine().generate([p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                     repetition_penalty=3.0))[0]["outputs"][0]
    assert not set(rep["token_ids"]) & set(p) or rep["token_ids"] != plain["token_ids"]


def test_top_k_min_p_restrict_support():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    assert (processed_probs(logits, [SamplingParams(top_k=2)])[0, 2:] == 0).all()
    pr = processed_probs(logits, [SamplingParams(min_p=0.3)])[0]
    full = torch.softmax(logits[0], 0)
    assert torch.equal(pr > 0, full >= 0.3 * full.max())
    pr = processed_probs(logits, [SamplingParams(top_p=0.7)])[0]
    assert (pr > 0).sum() == 2 and torch.isclose(pr.sum(), torch.tensor(1.0))


def test_speculative_rejection_sampling_follows_target_distribution():
    """First emitted token after verifying a draft drawn from q is distributed as the target p."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(4)
    accepted = 0
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        toks = verify_drafts(torch.stack([p, p]), [d], q[None], generator=None, default=g)
        counts[toks[0]] += 1
        accepted += len(toks) == 2
    freq = counts / n
    assert (freq - p).abs().max() < 0.015, freq
    assert abs(accepted / n - torch.minimum(p, q).sum().item()) < 0.015


def test_speculative_sampling_end_to_end_matches_plain_distribution(make_engine):
    """Sampled decoding with MTP drafts: the joint law of the first two tokens matches plain sampling."""
    (p,) = prompts(10, (8,))
    n = 240
    params = [SamplingParams(temperature=1.0, top_k=3, max_tokens=2, ignore_eos=True, seed=s) for s in range(n)]
    plain = make_engine().generate([p] * n, params)
    spec = make_engine(num_speculative_tokens=1).generate([p] * n, params)
    assert sum(r["outputs"][0]["spec"][0] for r in spec) > 0          # drafts were really verified

    def law(res):
        c: dict[tuple, float] = {}
        for r in res:
            k = tuple(r["outputs"][0]["token_ids"])
            c[k] = c.get(k, 0) + 1 / n
        return c
    a, b = law(plain), law(spec)
    tv = 0.5 * sum(abs(a.get(k, 0) - b.get(k, 0)) for k in set(a) | set(b))
    assert tv < 0.2, (tv, a, b)   # two samples of one law over <= 9 pairs: TV ~0.08 expected


def test_greedy_verification_keeps_drafts_up_to_the_first_mismatch():
    assert accept_greedy([5, 6], [5, 6, 9]) == [5, 6, 9]        # all accepted, then the bonus token
    assert accept_greedy([5, 6], [5, 7, 9]) == [5, 7]           # the second draft rejected: the target's token
    assert accept_greedy([4], [5, 1]) == [5]
    logits = torch.tensor([[0.1, 2.0, 0.3], [1.0, 0.5, 0.2]])
    mixed = processed_probs(logits, [SamplingParams(temperature=0), SamplingParams(temperature=1.0)])
    assert mixed[0].tolist() == [0.0, 1.0, 0.0]                 # greedy rows: one-hot on the argmax
    assert torch.allclose(mixed[1], torch.softmax(logits[1], -1))
