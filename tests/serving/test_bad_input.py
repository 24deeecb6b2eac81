"""Bad input, table-driven: each case gets its 4xx in OpenAI's error format (the field at fault named, no stack
trace, no validator dump), and a valid request right after it still succeeds."""
from __future__ import annotations

import httpx
import pytest

from bad_input_helpers import CASES, CHAT, chat, send, valid_request_succeeds
from serve_helpers import TIGHT_KEY, assert_openai_error


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(served):
    assert len(CASES) >= 30
    for case, method, path, body, status, param in CASES:
        err = assert_openai_error(send(served.url, method, path, body), status)
        if param is not None:
            assert err["param"] == param, (case, err)
        assert "131072" in err["message"] if "context" in case or case == "max-tokens-huge" else True, (case, err)
        valid_request_succeeds(served.url)


@pytest.mark.parametrize("case,headers,body,status", [
    ("missing-api-key", {}, chat(), 401),
    ("wrong-api-key", {"authorization": "Bearer nope"}, chat(), 401),
    ("not-bearer", {"authorization": TIGHT_KEY}, chat(), 401),
    ("huge-body", {"authorization": f"Bearer {TIGHT_KEY}"}, chat(messages=[{"role": "user", "content": "x" * 70000}]),
     413),
])
def test_api_key_and_body_limit(tight, case, headers, body, status):
    assert_openai_error(send(tight.url, "POST", CHAT, body, headers), status)
    assert httpx.get(f"{tight.url}/health").status_code == 200          # /health needs no key
    assert_openai_error(httpx.get(f"{tight.url}/v1/models"), 401)
    valid_request_succeeds(tight.url, {"authorization": f"Bearer {TIGHT_KEY}"})
