"""Serving fixtures: ONE Serve app for the session (`served`), on the session's Ray cluster, on a free port.

Its config scales the model deployment between 1 and 2 replicas with short delays, so the autoscaling test runs on
the same app the API tests use; it serves LoRA adapters from `lora_root` (and one preloaded from lora_modules). The
one app with a different config (`tight`: an API key, a small body limit, a queue bound of one) shares the port
under its own route prefix. The vLLM engine's tests get ONE app with `engine: vllm` (vLLM's engine start is slow)
and a raymoe app on the same checkpoint, made only when they run. Serve shuts down when the session ends.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from serve_helpers import (LORA_MAX_LORAS, LORA_MAX_RANK, TEST_AUTOSCALING, TIGHT_KEY, Served, app_args, deploy,
                           free_port, make_adapter, wait_running)

# Both engines of the side-by-side tests: the same limits (the KV cache's 256 blocks make the "beyond the KV cache"
# bad input), no compilation (vLLM's torch.compile of the model takes minutes on 2 cores; raymoe's cpu_compile is
# off by default).
PAIR_ENGINE = {"num_blocks": 256, "block_size": 16, "max_num_seqs": 16, "enforce_eager": True}


@pytest.fixture(scope="session")
def serve_http(ray_cluster):
    """Serve on this session's Ray, HTTP on 127.0.0.1:<free port>. Shut down at the session's end."""
    from ray import serve
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory) -> Path:
    """The main app's adapter root (lora_root): tests write adapters here and serve them by folder name."""
    return tmp_path_factory.mktemp("lora-root")


@pytest.fixture(scope="session")
def preloaded_adapter(tiny_ckpt_fp32, tmp_path_factory) -> Path:
    """An adapter outside lora_root that the main app preloads as lora_modules {"preloaded": <it>}."""
    return make_adapter(tiny_ckpt_fp32, tmp_path_factory.mktemp("modules") / "preloaded", seed=7)


@pytest.fixture(scope="session")
def served(serve_http, tiny_ckpt_fp32, lora_root, preloaded_adapter) -> Served:
    return deploy(serve_http, "main", "/", app_args(
        tiny_ckpt_fp32, autoscaling=TEST_AUTOSCALING, max_ongoing_requests=8, max_queued_requests=64,
        lora_root=str(lora_root), lora_modules={"preloaded": str(preloaded_adapter)}, max_loras=LORA_MAX_LORAS,
        max_cpu_loras=2, max_lora_rank=LORA_MAX_RANK, reasoning=True))


@pytest.fixture(scope="session")
def tight(serve_http, tiny_ckpt_fp32) -> Served:
    """A second app, for what needs another config: an API key, a 64 KiB body limit, and room for one request
    running plus one queued (so a third gets 429)."""
    return deploy(serve_http, "tight", "/tight", app_args(
        tiny_ckpt_fp32, max_ongoing_requests=1, max_queued_requests=1, max_request_bytes=65536,
        api_key_env="RAYMOE_TEST_KEY", runtime_env={"env_vars": {"RAYMOE_TEST_KEY": TIGHT_KEY}}))


@pytest.fixture(scope="session")
def vllm_pair(serve_http, tiny_ckpt_vllm) -> dict[str, Served]:
    """{"raymoe": app, "vllm": app}: the same checkpoint and config behind the same ingress, one engine each."""
    from raymoe.deployments.app import vllm_python
    from raymoe.deployments.config import VLLMSettings
    try:
        vllm_python(VLLMSettings())
    except ValueError as e:
        pytest.skip(f"no vLLM environment: {e} (make test installs one with benchmarks/setup_vllm.sh)")
    apps = {"vllm": deploy(serve_http, "vllm", "/vllm", app_args(tiny_ckpt_vllm, engine={**PAIR_ENGINE,
                                                                                            "kind": "vllm"})),
            "raymoe": deploy(serve_http, "vllm-peer", "/vllm-peer", app_args(tiny_ckpt_vllm, engine=PAIR_ENGINE))}
    for app in apps.values():
        wait_running(app.app, 1200)
    return apps
