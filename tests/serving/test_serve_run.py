"""Ray Serve's own CLI builds the app: `serve run raymoe.deployments.app:build_app model=...` (key=value args, as
strings) deploys onto the session's cluster and answers; the app is deleted afterwards."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx


def test_serve_run_builds_the_app(ray_cluster, serve_http, tiny_ckpt_fp32):
    from ray import serve
    address = ray_cluster.get_runtime_context().gcs_address
    exe = Path(sys.executable).with_name("serve")
    cmd = [str(exe), "run", "--address", address, "--non-blocking", "--name", "clirun", "--route-prefix", "/clirun",
           "raymoe.deployments.app:build_app", f"model={tiny_ckpt_fp32}", "served_model_name=via-serve-run",
           "num_cpus=0.25", "ingress_num_cpus=0.1"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                r = httpx.get(f"{serve_http}/clirun/v1/models", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert r.json()["data"][0]["id"] == "via-serve-run"
    finally:
        serve.delete("clirun")
