"""`engine: raymoe` against `engine: vllm` behind the same HTTP app (Ray Serve: proxy -> OpenAIIngress -> model
replica), same checkpoint, same token-id prompts, greedy, every request exactly max_tokens tokens (ignore_eos).
Prints, per concurrency, generated tokens/s of each engine and their ratio, and TTFT p50/p99 of each (from sending
the request to the first SSE chunk with text), plus the machine's load average before and after each engine.

    bash benchmarks/setup_vllm.sh
    .venv/bin/python benchmarks/serve_engines.py [--model DIR] [--max-tokens 64] [--concurrency 1,16,64]

The engines run one after another, never together (vLLM's engine-core process busy-polls a core while it is up):
deploy raymoe's app, warm up, measure every concurrency (best of --repeats), delete it; then the same for vLLM's.
Each engine at its best on the CPU: raymoe with cpu_compile, vLLM at its default compilation (torch.compile through
inductor; --vllm-eager to skip it) and in bfloat16 (on AMX CPUs its AMX MLA backend takes only bf16 weights; float32
runs its reference MLA backend). Compilation happens in the untimed warm-up. Without --model a `vllm`-preset tiny
checkpoint (the MLA sizes vLLM's CPU backend runs) is written in bfloat16: the same weights for both engines, each
computing in its own --raymoe-dtype / --vllm-dtype (a bf16 tensor widened to fp32 is exact).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_http import pct, prompts, run_http  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def wait_running(app: str, timeout_s: float = 3600) -> float:
    from ray import serve
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        st = serve.status().applications.get(app)
        if st is not None and st.status == "RUNNING":
            return time.monotonic() - t0
        if st is not None and st.status == "DEPLOY_FAILED":
            raise SystemExit(f"{app}: deploy failed: {st.message}")
        time.sleep(1)
    raise SystemExit(f"{app}: not running after {timeout_s} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--raymoe-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--vllm-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--threads", type=int, default=2, help="raymoe's torch threads (vLLM binds its own: all cores "
                                                           "but the one its engine-core process keeps)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engines", default="raymoe,vllm")
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (enforce_eager)")
    a = ap.parse_args()
    conc = [int(c) for c in a.concurrency.split(",")]

    from raymoe.platform.checkpoint import TinySpec, write_tiny_checkpoint
    model = a.model or str(write_tiny_checkpoint(tempfile.mkdtemp(prefix="serve-engines-"),
                                                 TinySpec(preset="vllm", seed=1, dtype="bfloat16")))
    # max_model_len: vLLM checks that its KV blocks hold one request of max_model_len (else the blocks' tokens)
    common = {"max_num_seqs": 64, "num_blocks": 2048, "block_size": 16, "max_model_len": 4096}
    engines = {"raymoe": {**common, "cpu_compile": True, "cpu_threads": a.threads, "dtype": a.raymoe_dtype},
               "vllm": {**common, "kind": "vllm", "enforce_eager": a.vllm_eager, "dtype": a.vllm_dtype}}
    if a.vllm_dtype == "bfloat16":             # vLLM's AMX MLA backend takes blocks of a multiple of 32 tokens only
        engines["vllm"].update(block_size=32, num_blocks=1024)
    sets = {c: prompts(max(8, 2 * c), 700, seed=c) for c in conc}

    import ray
    from ray import serve

    from raymoe.deployments.app import build_app
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    results: dict[str, dict] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name in a.engines.split(","):
            load0 = os.getloadavg()[0]
            serve.run(build_app({"model": model, "served_model_name": "tiny", "engine": engines[name],
                                 "num_cpus": 1, "max_ongoing_requests": 128, "metrics_interval_s": 1.0}),
                      name=name, route_prefix="/", blocking=False)
            start_s = wait_running(name)

            async def measure() -> dict:
                t = time.perf_counter()
                for c in sorted(set(conc)):    # warm-up: every batch-size class compiles here, untimed
                    await run_http(url, prompts(c, 700, 99), a.max_tokens, c)
                out = {"warmup_s": time.perf_counter() - t}
                for c in conc:
                    runs = [await run_http(url, sets[c], a.max_tokens, c) for _ in range(a.repeats)]
                    out[c] = max(runs, key=lambda r: r["tok_s"])
                return out
            results[name] = {**asyncio.run(measure()), "start_s": start_s, "load": (load0, os.getloadavg()[0])}
            serve.delete(name)
            print(f"[{name}] start {start_s:.0f} s, warm-up {results[name]['warmup_s']:.0f} s, load average "
                  f"{load0:.1f} -> {results[name]['load'][1]:.1f}", flush=True)
            for c in conc:                     # printed now: a later engine's failure must not lose these
                x = results[name][c]
                print(f"[{name}] c={c} {x['tok_s']:.0f} tok/s, TTFT p50 {pct(x['ttft'], .5):.1f} ms, "
                      f"p99 {pct(x['ttft'], .99):.1f} ms", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    r, v = results.get("raymoe"), results.get("vllm")
    print(f"\n{model}, max_tokens {a.max_tokens}, prompts 16-32 tokens, greedy, ignore_eos; raymoe {a.raymoe_dtype} "
          f"cpu_compile {a.threads} threads; vLLM {a.vllm_dtype} {'eager' if a.vllm_eager else 'default compilation'}\n")
    print("| concurrency | requests | raymoe tok/s | vLLM tok/s | raymoe / vLLM | TTFT p50 raymoe / vLLM (ms) | "
          "TTFT p99 raymoe / vLLM (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for c in conc:
        if r is None or v is None:
            continue                           # one engine only: its lines above
        assert r[c]["tokens"] == v[c]["tokens"], (r[c]["tokens"], v[c]["tokens"])
        print(f"| {c} | {len(sets[c])} | {r[c]['tok_s']:.0f} | {v[c]['tok_s']:.0f} | "
              f"{r[c]['tok_s'] / v[c]['tok_s']:.2f} | {pct(r[c]['ttft'], .5):.1f} / {pct(v[c]['ttft'], .5):.1f} | "
              f"{pct(r[c]['ttft'], .99):.1f} / {pct(v[c]['ttft'], .99):.1f} |")


if __name__ == "__main__":
    main()
