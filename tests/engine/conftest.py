"""Engine fixtures: one fp32 tiny model shared by the engine tests, and its no-cache greedy reference."""
from __future__ import annotations

import os

import pytest
import torch

from raymoe.platform.config import EngineConfig
from raymoe.platform.engine import LLMEngine
from raymoe.platform.model import from_pretrained


DEVICE = os.environ.get("RAYMOE_TEST_DEVICE", "cpu")   # the engine suite also runs on a GPU machine


@pytest.fixture(scope="session")
def model32(tiny_ckpt_fp32):
    return from_pretrained(tiny_ckpt_fp32, dtype=torch.float32, device=DEVICE)


@pytest.fixture
def make_engine(tiny_ckpt_fp32, model32):
    def make(**kw) -> LLMEngine:
        kw.setdefault("num_blocks", 512)
        kw.setdefault("block_size", 4)
        return LLMEngine(EngineConfig(model=str(tiny_ckpt_fp32), device=DEVICE, **kw), model=model32)
    return make
