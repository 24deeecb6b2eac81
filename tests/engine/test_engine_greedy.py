"""The engine's greedy output equals argmax decoding of the reference forward, token for token."""
from __future__ import annotations

import pytest

from raymoe.platform.config import SamplingParams
from engine_helpers import greedy_reference, prompts

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def refs(model32):
    ps = prompts(0, (3, 17, 9, 30, 5))
    return ps, [greedy_reference(model32, p, GREEDY.max_tokens) for p in ps]


@pytest.mark.parametrize("chunked, budget, mtp", [(True, 8, 0), (False, 64, 0), (True, 8, 1), (True, 64, 2),
                                                  (False, 64, 1)])
def test_mixed_batch_joining_at_different_steps(make_engine, refs, chunked, budget, mtp):
    ps, want = refs
    eng = make_engine(enable_chunked_prefill=chunked, max_num_batched_tokens=budget, num_speculative_tokens=mtp)
    got: dict[str, list[int]] = {}
    for i in range(2):
        eng.add_request(f"r{i}", ps[i], GREEDY)
    steps = 0
    while eng.has_unfinished():
        for d in eng.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
        steps += 1
        if steps == 2:
            eng.add_request("r2", ps[2], GREEDY)
        if steps == 4:
            eng.add_request("r3", ps[3], GREEDY)
            eng.add_request("r4", ps[4], GREEDY)
    assert [got[f"r{i}"] for i in range(5)] == want
    eng.blocks.check_no_leak()


def test_chunked_prefill_splits_long_prompt_while_others_decode(make_engine, model32):
    long, short = prompts(1, (40, 4))
    eng = make_engine(max_num_batched_tokens=8)
    eng.add_request("short", short, GREEDY)
    eng.step()                                               # short prefilled
    eng.add_request("long", long, GREEDY)
    short_tokens_during_prefill = 0
    res: dict[str, list[int]] = {}
    while any(s.num_uncomputed > 1 for s in eng.requests.get("long", [])):
        for d in eng.step():
            res.setdefault(d.request_id, []).extend(d.token_ids)
            if d.request_id == "short":
                short_tokens_during_prefill += len(d.token_ids)
    assert short_tokens_during_prefill >= 4                   # decode kept flowing during the 40-token prefill
    while eng.has_unfinished():
        for d in eng.step():
            res.setdefault(d.request_id, []).extend(d.token_ids)
    assert res["long"] == greedy_reference(model32, long, 10)


def test_prefix_cache_hit_gives_same_tokens(make_engine, model32):
    (p,) = prompts(2, (23,))
    eng = make_engine(max_num_batched_tokens=64)
    first = eng.generate([p], GREEDY)[0]["outputs"][0]["token_ids"]
    hits = eng.blocks.prefix_hits
    second = eng.generate([p], GREEDY)[0]["outputs"][0]["token_ids"]
    assert eng.blocks.prefix_hits == hits + 1
    assert first == second == greedy_reference(model32, p, 10)
    eng.blocks.check_no_leak()


def test_preemption_and_resumption_give_the_same_tokens(make_engine, model32):
    ps = prompts(3, (10, 12, 9, 11))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    eng = make_engine(num_blocks=18, block_size=4, max_num_batched_tokens=64, enable_prefix_caching=False)
    out = eng.generate(ps, params)
    assert eng.scheduler.num_preemptions > 0
    assert [o["outputs"][0]["token_ids"] for o in out] == [greedy_reference(model32, p, 16) for p in ps]
    eng.blocks.check_no_leak()


def test_abort_frees_blocks(make_engine):
    ps = prompts(4, (15, 8))
    eng = make_engine()
    eng.add_request("a", ps[0], GREEDY)
    eng.add_request("b", ps[1], GREEDY)
    eng.step()
    eng.abort("a")
    while eng.has_unfinished():
        eng.step()
    eng.blocks.check_no_leak()
    assert not eng.requests
