"""Autoscaling on the session app: a burst of streaming requests takes the model deployment from 1 to 2 replicas,
and it goes back to 1 after the load stops (short delays in the test config). No request fails on the way up or
down; /metrics counts the replicas."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
from ray import serve


def running_replicas(app: str) -> int:
    dep = serve.status().applications[app].deployments["ModelServer"]
    return dep.replica_states.get("RUNNING", 0)


async def _worker(c: httpx.AsyncClient, url: str, stop: asyncio.Event, failures: list, done: list,
                  max_tokens: int) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    while not stop.is_set():
        try:
            async with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            if r.status_code != 200 or lines[-1] != "data: [DONE]":
                failures.append((r.status_code, lines[-2:]))
            else:
                last = json.loads(lines[-2].removeprefix("data: "))
                assert last["choices"][0]["finish_reason"] == "length"
                done.append(1)
        except Exception as e:                  # noqa: BLE001 (counted as a failure)
            failures.append(repr(e))


async def _until(pred, timeout: float) -> bool:
    t = time.time() + timeout
    while time.time() < t:
        if await asyncio.to_thread(pred):
            return True
        await asyncio.sleep(0.25)
    return False


def test_burst_scales_up_then_down_without_failures(served):
    assert running_replicas(served.app) == 1

    async def run():
        failures, done = [], []
        async with httpx.AsyncClient(timeout=120) as c:
            stop = asyncio.Event()
            burst = [asyncio.create_task(_worker(c, served.url, stop, failures, done, 64)) for _ in range(8)]
            up = await _until(lambda: running_replicas(served.app) == 2, 90)
            metrics = (await c.get(f"{served.url}/metrics")).text
            await asyncio.sleep(1.0)            # keep the load on the two replicas a moment
            stop.set()
            await asyncio.gather(*burst)
            n_burst = len(done)
            # a trickle of requests keeps flowing while the deployment scales back down
            stop2 = asyncio.Event()
            trickle = asyncio.create_task(_worker(c, served.url, stop2, failures, done, 8))
            down = await _until(lambda: running_replicas(served.app) == 1, 90)
            await asyncio.sleep(0.5)
            stop2.set()
            await trickle
        return up, down, failures, n_burst, len(done) - n_burst, metrics
    up, down, failures, n_burst, n_trickle, metrics = asyncio.run(run())
    assert up, "did not scale up to 2 replicas"
    assert down, "did not scale back down to 1 replica"
    assert failures == []
    assert n_burst >= 8 and n_trickle >= 1
    assert 'raymoe:num_replicas{model_name="tiny"}' in metrics
