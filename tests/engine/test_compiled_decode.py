"""The CPU decode step through torch.compile (`cpu_compile`) gives the reference's greedy tokens, for a lone
sequence, a few and many (the shape classes that get their own graph), with and without MTP verification."""
from __future__ import annotations

import os

import pytest

from raymoe.platform.config import SamplingParams
from engine_helpers import greedy_reference, prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

pytestmark = pytest.mark.skipif(os.environ.get("RAYMOE_TEST_DEVICE", "cpu") != "cpu",
                                reason="torch.compile of the decode step is the CPU path")


@pytest.fixture(scope="module")
def refs(model32):
    ps = prompts(7, (5, 19, 3, 26, 11, 8))
    return ps, [greedy_reference(model32, p, GREEDY.max_tokens) for p in ps]


@pytest.mark.parametrize("mtp", [0, 1])
def test_compiled_decode_equals_reference(make_engine, refs, mtp):
    ps, want = refs
    eng = make_engine(cpu_compile=True, num_speculative_tokens=mtp, max_num_batched_tokens=64)
    got: dict[str, list[int]] = {}
    eng.add_request("r0", ps[0], GREEDY)                       # alone: the single-sequence graph
    steps = 0
    while eng.has_unfinished():
        for d in eng.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
        steps += 1
        if steps == 3:                                         # then a few, then many at once
            eng.add_request("r1", ps[1], GREEDY)
        if steps == 5:
            for i in range(2, 6):
                eng.add_request(f"r{i}", ps[i], GREEDY)
    assert [got[f"r{i}"] for i in range(6)] == want
    compiled = eng.runner.compiled
    assert compiled.failed is None
    assert {key[:2] for key in compiled.seen if key[0] == "main"} == {("main", 1 + mtp)}   # decode / verification
    assert any(key[0] == "mtp" for key in compiled.seen) == bool(mtp)                   # MTP drafting
    assert len(compiled.seen) >= 2                             # more than one shape class was exercised
    eng.blocks.check_no_leak()
