"""Soak: `--concurrency` streaming chat requests kept in flight against the tiny model for `--minutes`, through the
same app and Serve settings `raymoe serve` runs (throughput-optimized Serve behind HAProxy, one model replica, its
engine in a child process). Reports requests, failures (any non-200, stream without [DONE] or short of its tokens,
or client error) and the model replica's RSS growth (the replica's process and its engine process together) from
the end of the first minute (warm-up) to the end.

    .venv/bin/python benchmarks/serve_soak.py [--minutes 10] [--concurrency 64]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import tempfile
import time

from raymoe.deployments.local import fast_serve_env

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
fast_serve_env()


def replica_rss(app: str) -> int:
    import psutil
    tag = f"ServeReplica:{app}:ModelServer"      # Ray's process title for the replica actor
    procs = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and tag in " ".join(p.info["cmdline"])]
    procs += [c for p in procs for c in p.children(recursive=True)]      # the engine process (engine_core: process)
    return sum(p.memory_info().rss for p in procs)


async def worker(c, url: str, stop: float, stats: dict, max_tokens: int) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about Ray."}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0.7}
    while time.monotonic() < stop:
        try:
            async with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            ok = r.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) >= max_tokens + 2
        except Exception:                      # noqa: BLE001 (a failure)
            ok = False
        stats["ok" if ok else "failed"] += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    import httpx
    import ray
    from ray import serve

    from raymoe.deployments.app import build_app
    from raymoe.platform.checkpoint import write_tiny_checkpoint
    model = str(write_tiny_checkpoint(tempfile.mkdtemp(prefix="soak-")))
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": model, "served_model_name": "tiny", "num_cpus": 1,
                             "max_ongoing_requests": 128, "engine": {"cpu_threads": 2}}), name="soak",
                  route_prefix="/")
        url, stats = f"http://127.0.0.1:{port}", {"ok": 0, "failed": 0}
        end = time.monotonic() + 60 * a.minutes

        async def run():
            limits = httpx.Limits(max_connections=a.concurrency + 4)
            async with httpx.AsyncClient(timeout=120, limits=limits) as c:
                tasks = [asyncio.create_task(worker(c, url, end, stats, a.max_tokens)) for _ in range(a.concurrency)]
                await asyncio.sleep(min(60, 60 * a.minutes / 2))
                rss0 = await asyncio.to_thread(replica_rss, "soak")
                await asyncio.gather(*tasks)
                return rss0, await asyncio.to_thread(replica_rss, "soak")
        rss0, rss1 = asyncio.run(run())
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"| {a.minutes:g} min at concurrency {a.concurrency} | {stats['ok']} requests ok | {stats['failed']} "
          f"failed | replica RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB ({(rss1 - rss0) / rss0:+.1%}) |")


if __name__ == "__main__":
    main()
