"""Serving fixtures: ONE Serve app for the session (`served`), on the session's Ray cluster, on a free port.

Its config scales the model deployment between 1 and 2 replicas with short delays, so the autoscaling test runs on
the same app the API tests use. Apps with a different config (a tiny queue bound, an API key) share the port under
their own route prefix and are deleted when their test module ends.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

import httpx
import pytest

TEST_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 0.5,
                    "downscale_delay_s": 3.0, "metrics_interval_s": 0.25, "look_back_period_s": 1.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str            # base URL of the app, e.g. http://127.0.0.1:18123 (no /v1)
    name: str           # the served model name
    app: str            # the Serve application name

    def client(self, **kw):
        from openai import OpenAI
        return OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def app_args(ckpt, **kw) -> dict:
    args = {"model": str(ckpt), "served_model_name": "tiny", "num_cpus": 0.5, "ingress_num_cpus": 0.25,
            "metrics_interval_s": 0.25, "engine": {"num_blocks": 256, "block_size": 16, "max_num_seqs": 16}}
    args.update(kw)
    return args


@pytest.fixture(scope="session")
def serve_http(ray_cluster):
    """Serve on this session's Ray, HTTP on 127.0.0.1:<free port>. Shut down at the session's end."""
    from ray import serve
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def deploy(serve_http: str, name: str, prefix: str, args: dict) -> Served:
    from ray import serve

    from raymoe.deployments.app import build_app
    serve.run(build_app(args), name=name, route_prefix=prefix, blocking=False)
    url = serve_http + (prefix if prefix != "/" else "")
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        import time
        time.sleep(0.1)
    return Served(url=url, name=args.get("served_model_name", "tiny"), app=name)


@pytest.fixture(scope="session")
def served(serve_http, tiny_ckpt_fp32) -> Served:
    return deploy(serve_http, "main", "/", app_args(tiny_ckpt_fp32, autoscaling=TEST_AUTOSCALING,
                                                      max_ongoing_requests=8, max_queued_requests=64))


TIGHT_KEY = "sekrit-key"


@pytest.fixture(scope="session")
def tight(serve_http, tiny_ckpt_fp32) -> Served:
    """A second app, for what needs another config: an API key, a 64 KiB body limit, and room for one request
    running plus one queued (so a third gets 429)."""
    return deploy(serve_http, "tight", "/tight", app_args(
        tiny_ckpt_fp32, max_ongoing_requests=1, max_queued_requests=1, max_request_bytes=65536,
        api_key_env="RAYMOE_TEST_KEY", runtime_env={"env_vars": {"RAYMOE_TEST_KEY": TIGHT_KEY}}))


def assert_openai_error(r, status: int) -> dict:
    """The response is `status` with an OpenAI-format error body and no stack trace or validator dump."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    for leak in ("Traceback", "errors.pydantic.dev", 'File "', "input_value"):
        assert leak not in err["message"], err
    return err
