"""Grammar-constrained decoding in the engine (xgrammar): regex, choice and JSON-schema outputs match on a random
model; one compile per distinct grammar; unconstrained rows of a mixed batch are untouched; with MTP drafts the
constrained greedy output equals the non-speculative one, on the random model (drafts nearly always rejected) and on
the cycle-trained model (drafts mostly accepted, some refused by the grammar); a grammar xgrammar cannot take is a
RequestError before any work."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from raymoe.platform.config import GrammarSpec, SamplingParams
from raymoe.platform.engine import RequestError
from engine_helpers import CYCLE, cycle_text, prompts

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
REGEX = r"(cat|dog)-[0-9]{2}"
CHOICES = ["yes", "no", 'ma\u00f1ana "q"']
SPECS = [GrammarSpec(kind="json_schema", value=json.dumps(SCHEMA)), GrammarSpec(kind="regex", value=REGEX),
         GrammarSpec(kind="choice", value=json.dumps(CHOICES)), GrammarSpec(kind="json_object")]


def _check(spec: GrammarSpec, text: str) -> None:
    if spec.kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif spec.kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif spec.kind == "choice":
        assert text in CHOICES, text
    else:                                               # any JSON object: keys are unbounded, so it may not end
        assert text.startswith("{")


def _greedy(spec: GrammarSpec, n: int = 60) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, grammar=spec)


@pytest.mark.parametrize("mtp", [0, 2])
def test_constrained_outputs_match_and_mtp_changes_nothing(make_engine, mtp):
    ps = prompts(5, [3, 11, 6])
    base = make_engine().generate(ps * len(SPECS), [_greedy(s) for s in SPECS for _ in ps])
    eng = make_engine(num_speculative_tokens=mtp)
    out = eng.generate(ps * len(SPECS), [_greedy(s) for s in SPECS for _ in ps])
    for i, (a, b) in enumerate(zip(base, out)):
        a, b = a["outputs"][0], b["outputs"][0]
        assert a["finish_reason"] == "stop" or SPECS[i // len(ps)].kind == "json_object", a
        _check(SPECS[i // len(ps)], a["text"])
        assert b["token_ids"] == a["token_ids"]
    assert eng._grammars.misses == len(SPECS)          # one compile per distinct grammar, however many requests
    # sampled requests keep to the grammar too
    for s in SPECS:
        for r in eng.generate(ps, SamplingParams(temperature=1.0, seed=7, max_tokens=60, grammar=s)):
            _check(s, r["outputs"][0]["text"])


def test_unconstrained_rows_of_a_mixed_batch_are_untouched(make_engine):
    ps = prompts(9, [5, 8, 13])
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = make_engine().generate(ps, free)
    mixed = make_engine().generate(ps + ps, [free] * 3 + [_greedy(SPECS[1])] * 3)
    assert [m["outputs"][0]["token_ids"] for m in mixed[:3]] == [a["outputs"][0]["token_ids"] for a in alone]
    assert all(re.fullmatch(REGEX, m["outputs"][0]["text"]) for m in mixed[3:])


def test_mtp_accepted_runs_and_refused_drafts(cycle_engine, cycle_model):
    """The cycle model drafts its cycle (mostly accepted); the grammar allows only some of the cycle's tokens, so
    drafts it refuses are rejected at the first of them, and the result equals decoding without drafts."""
    eng = cycle_engine(0)
    tok = eng.tokenizer
    allowed = sorted(set(CYCLE))[:6]                    # two of the eight cycle ids are never allowed
    texts = [tok.decode([t]) for t in allowed]
    spec = GrammarSpec(kind="regex", value="(" + "|".join(re.escape(t) for t in texts) + "){1,40}")
    params = SamplingParams(temperature=0, max_tokens=24, grammar=spec)
    ps = [cycle_text(0, 6), cycle_text(5, 9), cycle_text(9, 3)]
    base = eng.generate(ps, params)
    for k in (1, 2):
        out = cycle_engine(k).generate(ps, params)
        assert [o["outputs"][0]["token_ids"] for o in out] == [b["outputs"][0]["token_ids"] for b in base]
        proposed = sum(o["outputs"][0]["spec"][0] for o in out)
        accepted = sum(o["outputs"][0]["spec"][1] for o in out)
        assert 0 < accepted < proposed, (accepted, proposed)   # runs accepted, and some drafts refused
    for b in base:
        assert re.fullmatch(spec.value, b["outputs"][0]["text"])


@pytest.mark.parametrize("spec, words", [
    (GrammarSpec(kind="regex", value="(?<=a)b"), "Lookbehind"),
    (GrammarSpec(kind="json_schema", value='{"type": "nonsense"}'), "nonsense"),
    (GrammarSpec(kind="ebnf", value="root ::= missing"), "missing"),
    (GrammarSpec(kind="choice", value="[]"), "empty"),
])
def test_bad_grammar_is_a_request_error(make_engine, spec, words):
    eng = make_engine()
    with pytest.raises(RequestError, match=words):
        eng.add_request("bad", [5, 6, 7], _greedy(spec))
    assert not eng.has_unfinished() and "bad" not in eng.requests
