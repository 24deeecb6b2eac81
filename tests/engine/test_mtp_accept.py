"""MTP speculative decoding on a model whose drafts are mostly accepted (conftest's `cycle_model`): the accept path.

Random weights accept ~0.1% of drafts, so the other engine tests check only rejection. Here several tokens are
committed per step; greedy output must not change with k = 0, 1, 2 drafts under chunked prefill, prefix-cache hits,
preemption and 4-token blocks, must stop where k = 0 stops when max_tokens, a stop token or a stop string falls
inside an accepted run, and sampled output must keep the target distribution.
"""
from __future__ import annotations

import pytest
import torch

from raymoe.platform.config import SamplingParams
from raymoe.platform.engine import LLMEngine
from raymoe.platform.engine.sampler import processed_probs
from engine_helpers import cycle_text, greedy_reference

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
# cycle pieces of several lengths (one long enough to be prefilled in chunks) and one prompt that starts off the cycle
PROMPTS = [cycle_text(0, 5), cycle_text(3, 17), cycle_text(7, 9), cycle_text(11, 30), cycle_text(5, 2),
           [17, 901, 250, 33, 611] + cycle_text(9, 4)]
pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: the many small steps run on one thread


@pytest.fixture(scope="module")
def reference(cycle_model):
    return [greedy_reference(cycle_model[1], p, GREEDY.max_tokens) for p in PROMPTS]


def _tokens(out: list[dict]) -> list[list[int]]:
    return [o["outputs"][0]["token_ids"] for o in out]


def _acceptance(out: list[dict]) -> float:
    proposed = sum(o["outputs"][0]["spec"][0] for o in out)
    return sum(o["outputs"][0]["spec"][1] for o in out) / proposed


def _staggered(eng: LLMEngine, params: SamplingParams) -> tuple[list[list[int]], float]:
    """PROMPTS joining at different steps (prefill chunks and verification steps share batches): the tokens of
    each, and the acceptance rate."""
    got: dict[int, list[int]] = {}
    prop = acc = 0
    joins = {0: [0, 1], 2: [2], 4: [3, 4, 5]}
    step = 0
    while step in joins or eng.has_unfinished():
        for i in joins.get(step, []):
            eng.add_request(str(i), PROMPTS[i], params)
        for d in eng.step():
            got.setdefault(int(d.request_id), []).extend(d.token_ids)
            if d.finished:
                prop, acc = prop + d.spec_proposed, acc + d.spec_accepted
        step += 1
    return [got[i] for i in range(len(PROMPTS))], acc / prop if prop else 0.0


@pytest.mark.parametrize("k", [1, 2])
def test_drafts_are_mostly_accepted_and_greedy_tokens_unchanged(cycle_engine, reference, k):
    out = cycle_engine(k, max_num_batched_tokens=64).generate(PROMPTS, GREEDY)
    assert _acceptance(out) > 0.5
    assert _tokens(out) == reference
    assert _tokens(cycle_engine(0, max_num_batched_tokens=64).generate(PROMPTS, GREEDY)) == reference


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("chunked, budget", [(True, 8), (False, 64)])
def test_accepted_runs_with_chunked_prefill_and_staggered_joins(cycle_engine, reference, k, chunked, budget):
    eng = cycle_engine(k, enable_chunked_prefill=chunked, max_num_batched_tokens=budget)
    tokens, acceptance = _staggered(eng, GREEDY)
    assert tokens == reference
    assert acceptance > 0.5 or k == 0
    eng.blocks.check_no_leak()


@pytest.mark.parametrize("k", [1, 2])
def test_accepted_runs_after_a_prefix_cache_hit(cycle_engine, reference, k):
    eng = cycle_engine(k, max_num_batched_tokens=64)
    first = eng.generate([PROMPTS[3]], GREEDY)
    hits = eng.blocks.prefix_hits
    second = eng.generate([PROMPTS[3]], GREEDY)
    assert eng.blocks.prefix_hits == hits + 1
    assert _tokens(first) == _tokens(second) == [reference[3]]
    assert _acceptance(second) > 0.5
    eng.blocks.check_no_leak()


@pytest.mark.parametrize("k", [1, 2])
def test_accepted_runs_through_preemption(cycle_engine, reference, k):
    eng = cycle_engine(k, num_blocks=24, max_num_batched_tokens=64, enable_prefix_caching=False)
    out = eng.generate(PROMPTS, GREEDY)
    assert eng.scheduler.num_preemptions > 0
    assert _tokens(out) == reference
    assert _acceptance(out) > 0.5
    eng.blocks.check_no_leak()


def _ends(out: list[dict]) -> list[tuple]:
    return [(o["outputs"][0]["token_ids"], o["outputs"][0]["text"], o["outputs"][0]["finish_reason"]) for o in out]


def test_max_tokens_inside_an_accepted_run_stops_where_plain_decoding_stops(cycle_engine):
    params = [GREEDY.model_copy(update={"max_tokens": n}) for n in range(1, 10)]
    plain = _ends(cycle_engine(0).generate([PROMPTS[1]] * 9, params))
    assert [len(t) for t, _, _ in plain] == list(range(1, 10))
    for k in (1, 2):
        spec = cycle_engine(k).generate([PROMPTS[1]] * 9, params)
        assert _ends(spec) == plain
        assert _acceptance(spec) > 0.5


def _step_runs(eng: LLMEngine, prompt: list[int], params: SamplingParams) -> list[list[int]]:
    """The tokens each engine step emitted for one request."""
    eng.add_request("r", prompt, params)
    runs = []
    while eng.has_unfinished():
        runs += [d.token_ids for d in eng.step() if d.token_ids]
    return runs


@pytest.mark.parametrize("k", [1, 2])
def test_stop_token_or_stop_string_inside_an_accepted_run(cycle_engine, k):
    p = PROMPTS[2]
    full = cycle_engine(0).generate([p], GREEDY)[0]["outputs"][0]
    ids, text = full["token_ids"], full["text"]
    ends, n = set(), 0                                     # output indices that end a step's run under k drafts
    for run in _step_runs(cycle_engine(k), p, GREEDY):
        n += len(run)
        ends.add(n - 1)
    inside = 0
    for j in range(1, GREEDY.max_tokens - 2):
        at = len(cycle_engine(0).tokenizer.decode(ids[:j]))
        stop = text[at - 1:at + 1]                         # a stop string completed by token j's first character
        if ids[j] in ids[:j] or text.find(stop) != at - 1:
            continue                                       # both stops must first occur at token j
        for params in (GREEDY.model_copy(update={"stop_token_ids": [ids[j]]}),
                       GREEDY.model_copy(update={"stop": [stop]})):
            want = _ends(cycle_engine(0).generate([p], params))
            assert want[0][0] == ids[:j + 1] and want[0][2] == "stop"
            assert _ends(cycle_engine(k).generate([p], params)) == want
        assert want[0][1] == text[:at - 1]
        inside += j not in ends
    assert inside >= 2                                     # some stops fell inside a run, not at its end


def _target_law(model, prompt: list[int], params: SamplingParams, n: int) -> dict[tuple, float]:
    """Exact probability of every n-token continuation under the request's sampling distribution (the model's own
    softmax after temperature and top-k, each position from a full forward)."""
    law: dict[tuple, float] = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for pre, pp in law.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(pre)], device=model.lm_head.weight.device))[0, -1:]
            probs = processed_probs(logits, [params])[0].cpu()
            for t in probs.nonzero().flatten().tolist():
                nxt[pre + (t,)] = pp * float(probs[t])
        law = nxt
    return law


@pytest.mark.parametrize("k", [1, 2])
def test_sampled_tokens_keep_the_target_distribution(cycle_engine, cycle_model, k):
    """Chi-square goodness of fit of the first three sampled tokens (27 cells: top-3 at each position) against the
    model's exact law. k = 1 covers an accepted or corrected first draft then the bonus token; k = 2 two drafts."""
    prompt, n = PROMPTS[1], 2000
    params = SamplingParams(temperature=4.0, top_k=3, max_tokens=3, ignore_eos=True)
    law = _target_law(cycle_model[1], prompt, params, 3)
    out = cycle_engine(k).generate([prompt] * n, [params.model_copy(update={"seed": s}) for s in range(n)])
    assert _acceptance(out) > 0.5
    seen: dict[tuple, int] = {}
    for t in _tokens(out):
        seen[tuple(t)] = seen.get(tuple(t), 0) + 1
    assert set(seen) <= set(law)                            # nothing outside the top-3 supports
    cells, rest_exp, rest_obs = [], 0.0, 0                  # cells expecting < 5 samples are pooled
    for key, pr in law.items():
        if n * pr >= 5:
            cells.append((n * pr, seen.get(key, 0)))
        else:
            rest_exp, rest_obs = rest_exp + n * pr, rest_obs + seen.get(key, 0)
    cells.append((rest_exp, rest_obs))
    chi2 = sum((o - e) ** 2 / e for e, o in cells)
    p_value = float(torch.special.gammaincc(torch.tensor((len(cells) - 1) / 2), torch.tensor(chi2 / 2)))
    assert p_value > 1e-3, (chi2, len(cells), p_value)
