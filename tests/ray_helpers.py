"""A second, throwaway Ray cluster for tests that need `ray job submit` (the session's `ray_cluster` runs without a
dashboard, and ray.init cannot move the dashboard agent off its fixed default port, which other Ray instances on a
shared machine may hold). Imported by name from test modules (tests/ is on sys.path through its conftest)."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextmanager
def ray_head_node(venv_bin: Path, env: dict[str, str], num_cpus: int = 2, startup_s: float = 90):
    """`ray start --head --block` on loopback with its own ports and temp dir; yields the dashboard address (what
    `ray job submit --address` takes). Stopped by signalling that process (it takes its node's processes down with
    it): `ray stop` would kill every Ray process on the machine."""
    gcs, dash, client, agent = free_ports(4)
    tmp = tempfile.mkdtemp(prefix="rmft", dir="/tmp")          # short: Ray's unix socket paths must stay < 108
    log = open(Path(tmp) / "ray-start.log", "w")
    proc = subprocess.Popen(
        [str(venv_bin / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--num-cpus", str(num_cpus), "--temp-dir", tmp],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + startup_s
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray start failed: {(Path(tmp) / 'ray-start.log').read_text()[-2000:]}")
                time.sleep(1)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
