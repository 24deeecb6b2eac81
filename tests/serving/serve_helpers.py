"""Helpers shared by the serving tests (imported by name: every test folder has its own conftest module)."""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import httpx

TEST_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 0.5,
                    "downscale_delay_s": 3.0, "metrics_interval_s": 0.25, "look_back_period_s": 1.0}
TIGHT_KEY = "sekrit-key"


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
            "metrics_interval_s": 0.25, "default_max_tokens": 64,
            "engine": {"num_blocks": 256, "block_size": 16, "max_num_seqs": 16}}
    args.update(kw)
    return args


def deploy(serve_http: str, name: str, prefix: str, args: dict) -> Served:
    """Deploy build_app(args) as application `name` under `prefix`; return once its /health answers."""
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
        time.sleep(0.1)
    return Served(url=url, name=args.get("served_model_name", "tiny"), app=name)


def wait_running(app: str, timeout_s: float) -> None:
    """Block until Serve reports application `app` RUNNING (its replicas have started), or fail naming its state."""
    from ray import serve
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            break
        time.sleep(1)
    raise AssertionError(f"application {app!r} is not running after {timeout_s:.0f} s: {status}")


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
