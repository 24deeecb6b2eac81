"""Helpers shared by the serving tests (imported by name: every test folder has its own conftest module)."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from dataclasses import dataclass

import adapter_helpers
import httpx

TEST_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 0.5,
                    "downscale_delay_s": 3.0, "metrics_interval_s": 0.25, "look_back_period_s": 1.0}
TIGHT_KEY = "sekrit-key"
LORA_MAX_LORAS = 2          # the main app's adapters per replica (fewer than the tests use: Serve's LRU evicts)
LORA_MAX_RANK = 8           # the main app's max_lora_rank (a rank-16 adapter is refused)


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


def make_adapter(base, out, targets=("all",), rank: int = 4, seed: int = 0):
    """The shared test adapter (adapter_helpers), with factors large enough to change the tiny model's answers."""
    return adapter_helpers.make_adapter(base, out, targets, rank, seed=seed, std=0.2)


async def _stream(client: httpx.AsyncClient, url: str, headers: dict) -> tuple[int, float, str | None, int, str]:
    t0 = time.perf_counter()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 120,
            "ignore_eos": True, "stream": True}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        text = (await r.aread()).decode()
        lines = [line for line in text.splitlines() if line.startswith("data: ")]
        return r.status_code, time.perf_counter() - t0, r.headers.get("retry-after"), len(lines), text


async def burst(url: str, headers: dict, n: int) -> list[tuple[int, float, str | None, int, str]]:
    """n streamed chats of 120 tokens at once: (status, seconds, Retry-After, SSE data lines, body) each."""
    async with httpx.AsyncClient(timeout=120) as c:
        return await asyncio.wait_for(asyncio.gather(*[_stream(c, url, headers) for _ in range(n)]), 120)


def check_over_capacity(results: list[tuple[int, float, str | None, int, str]]) -> None:
    """A burst past capacity: some 200s that ran to the end, some 429s at once, in OpenAI's format with Retry-After;
    nothing else."""
    codes = sorted(r[0] for r in results)
    assert set(codes) <= {200, 429} and codes.count(200) >= 1 and codes.count(429) >= 1, codes
    for status, secs, retry, lines, text in results:
        if status == 429:
            assert retry is not None and int(retry) >= 0 and secs < 5, (secs, retry)
            err = json.loads(text)["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "rate_limit_exceeded", err
        else:
            assert lines >= 120, lines                       # accepted ones ran to the end


def metric_values(text: str, name: str) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)]


def check_disconnect_frees_kv(url: str, name: str) -> None:
    """A client that leaves mid-stream: the engine aborts its request and frees its KV blocks (/metrics shows it)."""
    body = {"model": name, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c:
        before = metric_values(c.get(f"{url}/metrics").text, "vllm:generation_tokens_total")[0]
        with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()          # kept open: leaving a for-loop over it would close the connection
            for _ in range(10):
                next(lines)
            deadline = time.time() + 20                  # the request holds blocks while it streams
            while time.time() < deadline:
                m = c.get(f"{url}/metrics").text
                if sum(metric_values(m, "vllm:kv_cache_usage_perc")) > 0:
                    break
                time.sleep(0.1)
            assert sum(metric_values(m, "vllm:num_requests_running")) >= 1
        # the client has gone: the engine aborts the request and frees its blocks
        deadline = time.time() + 20
        while time.time() < deadline:
            m = c.get(f"{url}/metrics").text
            if (sum(metric_values(m, "vllm:kv_cache_usage_perc")) == 0
                    and sum(metric_values(m, "vllm:num_requests_running")) == 0):
                break
            time.sleep(0.2)
        assert sum(metric_values(m, "vllm:kv_cache_usage_perc")) == 0, m
        assert sum(metric_values(m, "vllm:num_requests_running")) == 0
        gen = metric_values(m, "vllm:generation_tokens_total")[0]
    assert gen - before < 2500          # it stopped well before its 3000 tokens


def engine_process(app: str):
    """The child process (a psutil.Process) in which the app's one model replica steps its engine (engine_core:
    auto). Ray titles a replica's worker process `ray::ServeReplica:<app>:ModelServer`."""
    import psutil
    found = [p for p in psutil.process_iter(["cmdline"]) if "child_main" in " ".join(p.info["cmdline"] or [])
             and f"ServeReplica:{app}:ModelServer" in " ".join(p.parent().cmdline())]
    assert len(found) == 1, found
    return found[0]
