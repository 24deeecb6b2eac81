"""Fixtures for the finetuning tests: an fp32 tiny checkpoint, the Q&A pairs, one thread, the shared Ray."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ft_helpers import QA


@pytest.fixture(autouse=True, scope="module")
def _one_thread_here(one_thread):
    """Every finetune test runs on one intra-op thread, as each Ray Train worker does."""
    yield


@pytest.fixture(scope="session")
def tiny32(write_ckpt) -> Path:
    """fp32 tiny preset (1 dense + 3 MoE layers of 16 experts, MTP): exact comparisons with transformers."""
    return write_ckpt("ft_tiny32", seed=0, dtype="float32")


@pytest.fixture(scope="session")
def qa_pairs() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in QA.read_text().splitlines() if line.strip()]
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


@pytest.fixture(scope="session")
def local_ray(ray_cluster):
    """The session's shared local Ray instance (tests/conftest.py)."""
    return ray_cluster
