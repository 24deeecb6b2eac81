"""A model replica, or the engine process of one, that dies mid-request: its caller gets a 503 in OpenAI's format with
Retry-After (never a stack trace or a hang), and the app serves again once Serve has replaced the replica."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import ray

from serve_helpers import TIGHT_KEY, assert_openai_error, engine_process

AUTH = {"authorization": f"Bearer {TIGHT_KEY}"}


def _model_replica(app: str):
    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#ModelServer#")]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


def _killed_mid_request(url: str, kill) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3000, "ignore_eos": True}
    out = {}

    def long_request():
        out["r"] = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)                             # the request is running on the replica
    kill()
    t.join(timeout=120)
    assert not t.is_alive()
    return out["r"]


def _recovers(url: str) -> None:
    deadline = time.time() + 90                 # Serve starts a new replica; then requests succeed again
    while time.time() < deadline:
        r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        if r.status_code == 200:
            break
        assert r.status_code in (429, 503), r.text
        assert_openai_error(r, r.status_code)
        time.sleep(0.5)
    assert r.status_code == 200, r.text


def test_engine_process_death_is_503_then_recovers(tight):
    """SIGKILL the replica's engine process: the running request is a 503, the replica fails its health check and
    Serve replaces it."""
    child = engine_process(tight.app)
    r = _killed_mid_request(tight.url, lambda: os.kill(child.pid, signal.SIGKILL))
    assert_openai_error(r, 503)
    assert r.headers.get("retry-after") is not None
    _recovers(tight.url)
    assert engine_process(tight.app).pid != child.pid


def test_replica_death_is_503_then_recovers(tight):
    r = _killed_mid_request(tight.url, lambda: ray.kill(_model_replica(tight.app), no_restart=True))
    assert_openai_error(r, 503)
    assert r.headers.get("retry-after") is not None
    _recovers(tight.url)
