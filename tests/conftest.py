"""Shared fixtures: small random checkpoints in the real HF format, written once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def _write(root: Path, name: str, **kw) -> Path:
    from raymoe.platform.checkpoint import TinySpec, write_tiny_checkpoint
    return write_tiny_checkpoint(root / name, TinySpec(**kw))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a whole test module, as each Ray worker and shard has: on a shared 2-core
    machine two threads that wait on each other at every op make the tiny model's many small ops several times
    slower. Folders and modules opt in (an autouse fixture in their conftest, or `pytestmark`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ray_cluster():
    """The test session's one local Ray instance (address='local': never a cluster someone else started), shared by
    the finetuning, expert-parallel and serving tests. Its 8 logical CPUs let many small actors be placed on this
    2-core machine; they share the cores. Shut down when the session ends."""
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_root) -> Path:
    """The default tiny preset (bf16 tensors, 4 layers: 1 dense + 3 MoE, 16 experts in 4 groups, MTP)."""
    return _write(ckpt_root, "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_fp32(ckpt_root) -> Path:
    return _write(ckpt_root, "tiny32", seed=1, dtype="float32")


@pytest.fixture(scope="session")
def tiny_ckpt_vllm(ckpt_root) -> Path:
    """The `vllm` preset (kv_lora_rank 512, qk_rope_head_dim 64: MLA sizes vLLM's CPU backend runs), fp32."""
    return _write(ckpt_root, "tiny_vllm32", preset="vllm", seed=2, dtype="float32")


@pytest.fixture(scope="session")
def tiny_ckpt_fp8(ckpt_root) -> Path:
    return _write(ckpt_root, "tiny_fp8", seed=0, fp8=True)


@pytest.fixture(scope="session")
def write_ckpt(ckpt_root):
    """Factory: write_ckpt(name, **TinySpec fields) -> path."""
    return lambda name, **kw: _write(ckpt_root, name, **kw)
