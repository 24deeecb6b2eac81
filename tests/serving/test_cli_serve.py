"""`raymoe serve` (what `make serve` runs) in a subprocess: with no --model it writes the built-in tiny model under
the cache folder, starts its own local Ray, prints the base URL and answers GET /v1/models; SIGINT tears it all
down (its Ray included)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve_helpers import free_port


def test_raymoe_serve_answers_models(tmp_path):
    port = free_port()
    env = {**os.environ, "RAYMOE_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    raymoe = Path(sys.executable).with_name("raymoe")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([str(raymoe), "serve", "--port", str(port)], stdout=subprocess.PIPE, stderr=log,
                            text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()          # blocks until the app is up (or the process dies)
        assert f"http://127.0.0.1:{port}/v1" in line, (line, (tmp_path / "serve.log").read_text()[-3000:])
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "raymoe-tiny"
        assert (tmp_path / "cache" / "tiny" / "config.json").is_file()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    deadline = time.time() + 10                # its HTTP proxy is gone with its Ray
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
        except httpx.HTTPError:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the server still answers after SIGINT")
