"""Streaming through HTTP (Ray Serve: proxy -> OpenAIIngress -> ModelServer -> AsyncEngine, or with
`ingress: fused` proxy -> ModelServer serving the routes itself) against the same AsyncEngine driven directly
in-process: same tiny model, same token-id prompts, greedy, every request exactly max_tokens tokens (ignore_eos).
Prints, per app variant and concurrency, generated tokens/s of each and their ratio, and TTFT p50/p99 of each, as
time to the first text on both sides (HTTP: from sending the request to the first SSE chunk with text; direct: from
calling the engine to its first delta with text; a random tiny model's first token often decodes to no text yet).

    .venv/bin/python benchmarks/serve_http.py [--model DIR] [--max-tokens 64] [--concurrency 1,16,64]
        [--variants separate,fused] [--waves 8] [--json OUT.json]

Each concurrency c runs waves x c requests (at least --min-requests): with 2 waves, as this script ran before
2026-12-06, the first wave's start and the last one's tail were half the run, and the 16-stream ratio moved between
0.70 and 0.97 from run to run on the same host.

A variant is `separate` or `fused`, optionally with app args after a colon, `;`-separated:
`fused:max_ongoing_requests=64`, `separate:engine_core=process`.
Variants are deployed one after the other on the same Ray cluster (one app up at a time).

The two sides alternate, one at a time, best of --repeats each (the direct engine idles while HTTP runs). Both
engines use the same EngineConfig, torch threads included (a Ray replica would otherwise get OMP_NUM_THREADS = its
num_cpus). Set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 to measure Serve's throughput-optimized mode, and
RAY_SERVE_ENABLE_HA_PROXY=1 for its HAProxy ingress (HAProxy on the HTTP port forwarding to the ingress replicas'
own HTTP servers, instead of Serve's Python proxy); `raymoe serve` sets both when it starts its own Ray.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")   # deleting a variant's app: 30 s else


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randrange(16, 33))] for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


async def run_direct(engine, ps, max_tokens: int, conc: int) -> dict:
    from raymoe.platform.config import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    sem = asyncio.Semaphore(conc)
    ttft, toks = [], []

    async def one(p):
        async with sem:
            t0, first, n = time.perf_counter(), None, 0
            async for batch in engine.stream(p, params):        # the engine's cheapest interface
                if first is None and any(d.text for d in batch):
                    first = time.perf_counter() - t0
                n += sum(len(d.token_ids) for d in batch)
            ttft.append(first)
            toks.append(n)
    t0 = time.perf_counter()
    await asyncio.gather(*[one(p) for p in ps])
    wall = time.perf_counter() - t0
    return {"tok_s": sum(toks) / wall, "ttft": ttft, "tokens": sum(toks)}


async def run_http(url: str, ps, max_tokens: int, conc: int) -> dict:
    # aiohttp (vLLM's benchmark_serving client): httpx took 2.7x its CPU per streamed chunk here and capped the
    # measured HTTP tokens/s at 32-64 streams (BENCHMARKS.md)
    import aiohttp
    sem = asyncio.Semaphore(conc)
    ttft, toks = [], []

    async def one(s, p):
        async with sem:
            body = {"model": "tiny", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0, first, n = time.perf_counter(), None, 0
            async with s.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200, r.status
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    if first is None and b'"text":"' in line and b'"text":""' not in line:
                        first = time.perf_counter() - t0
                    if b'"usage":{' in line:
                        n = json.loads(line[6:])["usage"]["completion_tokens"]
            ttft.append(first)
            toks.append(n)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc + 4), timeout=timeout) as s:
        t0 = time.perf_counter()
        await asyncio.gather(*[one(s, p) for p in ps])
        wall = time.perf_counter() - t0
    return {"tok_s": sum(toks) / wall, "ttft": ttft, "tokens": sum(toks)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--waves", type=int, default=8, help="requests per concurrency: waves x c (at least --min-requests)")
    ap.add_argument("--min-requests", type=int, default=32)
    ap.add_argument("--variants", default="separate")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    conc = [int(c) for c in a.concurrency.split(",")]

    from raymoe.platform.checkpoint import TinySpec, write_tiny_checkpoint
    from raymoe.platform.config import EngineConfig
    from raymoe.platform.engine import AsyncEngine
    model = a.model or str(write_tiny_checkpoint(tempfile.mkdtemp(prefix="serve-bench-"),
                                                 TinySpec(seed=1, dtype="float32")))
    engine_kw = {"cpu_threads": a.threads, "max_num_seqs": 64, "num_blocks": 2048, "block_size": 16}
    sets = {c: prompts(max(a.min_requests, a.waves * c), 700, seed=c) for c in conc}

    variants = [parse_variant(v) for v in a.variants.split(",")]
    results: dict[str, dict[int, dict]] = {v: {c: {} for c in conc} for v, _ in variants}
    engine = AsyncEngine(EngineConfig(model=model, **engine_kw))    # idle (blocked on an event) while HTTP runs

    import ray
    from ray import serve

    from raymoe.deployments.app import build_app
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"

        def best(old: dict | None, new: dict) -> dict:
            return new if old is None or new["tok_s"] > old["tok_s"] else old

        async def both(res: dict[int, dict]):
            await run_direct(engine, prompts(4, 700, 99), a.max_tokens, 4)          # warm-up
            await run_http(url, prompts(4, 700, 99), a.max_tokens, 4)
            for c in conc:                     # alternate, best of --repeats each: other load on the machine
                for _ in range(a.repeats):     # drifts, and alternating lets both sides see the same drift
                    r = res[c]
                    r["direct"] = best(r.get("direct"), await run_direct(engine, sets[c], a.max_tokens, c))
                    r["http"] = best(r.get("http"), await run_http(url, sets[c], a.max_tokens, c))
        for name, extra in variants:
            serve.run(build_app({"model": model, "served_model_name": "tiny", "engine": engine_kw, "num_cpus": 1,
                                 "max_ongoing_requests": 128, "metrics_interval_s": 1.0, **extra}),
                      name="bench", route_prefix="/")
            asyncio.run(both(results[name]))
            serve.delete("bench")
            for c in conc:                     # as it goes, in case a time limit cuts the run short
                d, h = results[name][c]["direct"], results[name][c]["http"]
                print(f"{name} c={c}: direct {d['tok_s']:.0f} tok/s, HTTP {h['tok_s']:.0f} tok/s, TTFT p50 direct "
                      f"{pct(d['ttft'], 0.5):.1f} / HTTP {pct(h['ttft'], 0.5):.1f} ms", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        engine.shutdown()

    print(f"\nmax_tokens {a.max_tokens}, torch threads {a.threads}, prompts 16-32 tokens, greedy, ignore_eos, "
          f"RAY_SERVE_THROUGHPUT_OPTIMIZED={os.environ.get('RAY_SERVE_THROUGHPUT_OPTIMIZED', '0')}, "
          f"RAY_SERVE_ENABLE_HA_PROXY={os.environ.get('RAY_SERVE_ENABLE_HA_PROXY', '0')}\n")
    print("| app | concurrency | requests | direct tok/s | HTTP tok/s | ratio | TTFT p50 direct / HTTP (ms) | "
          "TTFT p99 direct / HTTP (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for name, _ in variants:
        for c in conc:
            d, h = results[name][c]["direct"], results[name][c]["http"]
            assert d["tokens"] == h["tokens"], (d["tokens"], h["tokens"])
            row = {"app": name, "concurrency": c, "requests": len(sets[c]), "direct_tok_s": d["tok_s"],
                   "http_tok_s": h["tok_s"], "ratio": h["tok_s"] / d["tok_s"],
                   "ttft_p50_direct_ms": pct(d["ttft"], .5), "ttft_p50_http_ms": pct(h["ttft"], .5),
                   "ttft_p99_direct_ms": pct(d["ttft"], .99), "ttft_p99_http_ms": pct(h["ttft"], .99)}
            rows.append(row)
            print(f"| {name} | {c} | {row['requests']} | {d['tok_s']:.0f} | {h['tok_s']:.0f} | {row['ratio']:.2f} | "
                  f"{row['ttft_p50_direct_ms']:.1f} / {row['ttft_p50_http_ms']:.1f} | "
                  f"{row['ttft_p99_direct_ms']:.1f} / {row['ttft_p99_http_ms']:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0"),
                       "ha_proxy": os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0"),
                       "max_tokens": a.max_tokens, "threads": a.threads, "rows": rows}, f, indent=1)


def parse_variant(spec: str) -> tuple[str, dict]:
    """`fused:max_ongoing_requests=64` -> ("fused:max_ongoing_requests=64", {"ingress": "fused", ...})."""
    kind, _, rest = spec.partition(":")
    extra: dict = {"ingress": kind}
    for kv in filter(None, rest.split(";")):
        k, _, v = kv.partition("=")
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:           # a bare word: engine_core=process
            extra[k] = v
    return spec, extra


if __name__ == "__main__":
    main()
