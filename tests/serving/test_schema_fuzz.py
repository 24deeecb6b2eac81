"""Property-based fuzz of the app's own OpenAPI document (schemathesis + hypothesis): every operation, bounded
examples, no 5xx and every error in OpenAI's format. Generation lengths are clamped so the fuzz stays short (the
huge values are the bad-input table's job). Examples are derandomized so CI is repeatable; RAYMOE_FUZZ_RANDOM=1
explores new ones (it found the two sampler overflows that translate.py now guards)."""
from __future__ import annotations

import os
import time

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES = 25


def _clamp(case, name: str) -> None:
    body = case.body
    if isinstance(body, dict):
        if "model" in body:
            body["model"] = name             # reach generation (a wrong name is the 404 test's job)
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > 16:
                body[key] = 16
        if isinstance(body.get("n"), int) and body["n"] > 4:
            body["n"] = 4


def test_openapi_fuzz_never_5xx(served):
    doc = httpx.get(f"{served.url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    t0, seen, codes = time.perf_counter(), [], {}
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  derandomize=not os.environ.get("RAYMOE_FUZZ_RANDOM"),
                  suppress_health_check=list(HealthCheck))
        def check(case):
            _clamp(case, served.name)
            r = case.call(base_url=served.url, timeout=30)
            assert r.status_code < 500, (op.label, case.body, r.status_code, r.text[:300])
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code >= 400:
                err = r.json()["error"]
                assert {"message", "type", "param", "code"} == set(err), r.text
        check()
        seen.append(op.label)
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize", "GET /v1/models"} <= set(seen)
    assert codes.get(200, 0) >= 10, codes               # the fuzz reached real work, not only refusals
    assert time.perf_counter() - t0 < 90
    print("fuzz status counts", codes, f"{time.perf_counter() - t0:.1f}s")
