"""Cold start of `raymoe serve` (built-in tiny model) to the first streamed token: from launching the command to
the first SSE chunk with text, with an empty cache (the tiny checkpoint is written first) and with a warm one.

    .venv/bin/python benchmarks/serve_cold_start.py [--port 18765]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def first_token_s(port: int, cache: str) -> float:
    env = {**os.environ, "RAYMOE_CACHE": cache, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    raymoe = Path(sys.executable).with_name("raymoe")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(raymoe), "serve", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    body = {"model": "raymoe-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "stream": True}
    try:
        while time.perf_counter() - t0 < 300:
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                  timeout=30) as r:
                    if r.status_code == 200:
                        for line in r.iter_lines():
                            if '"content":"' in line and '"content":""' not in line:
                                return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("no token within 300 s")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=18765)
    a = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="raymoe-cache-")
    cold = first_token_s(a.port, cache)
    warm = first_token_s(a.port, cache)
    print(f"| empty cache (writes the tiny checkpoint) | {cold:.1f} s |\n| warm cache | {warm:.1f} s |")


if __name__ == "__main__":
    main()
