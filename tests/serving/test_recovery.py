"""A model replica that dies mid-request: its caller gets a 503 in OpenAI's format with Retry-After (never a stack
trace or a hang), and the app serves again once Serve has replaced the replica."""
from __future__ import annotations

import threading
import time

import httpx
import ray

from serve_helpers import TIGHT_KEY, assert_openai_error

AUTH = {"authorization": f"Bearer {TIGHT_KEY}"}


def _model_replica(app: str):
    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#ModelServer#")]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


def test_replica_death_is_503_then_recovers(tight):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3000, "ignore_eos": True}
    out = {}

    def long_request():
        out["r"] = httpx.post(f"{tight.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)                             # the request is running on the replica
    ray.kill(_model_replica(tight.app), no_restart=True)
    t.join(timeout=120)
    assert not t.is_alive()
    assert_openai_error(out["r"], 503)
    assert out["r"].headers.get("retry-after") is not None
    deadline = time.time() + 90                 # Serve starts a new replica; then requests succeed again
    while time.time() < deadline:
        r = httpx.post(f"{tight.url}/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        if r.status_code == 200:
            break
        assert r.status_code in (429, 503), r.text
        assert_openai_error(r, r.status_code)
        time.sleep(0.5)
    assert r.status_code == 200, r.text
