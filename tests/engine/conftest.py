"""Engine fixtures: one fp32 tiny model shared by the engine tests, its no-cache greedy reference, and a tiny model
trained on a token cycle whose MTP drafts are mostly accepted."""
from __future__ import annotations

import os

import pytest
import torch

from raymoe.platform.config import EngineConfig
from raymoe.platform.engine import LLMEngine
from raymoe.platform.model import from_pretrained
from engine_helpers import train_on_cycle


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


@pytest.fixture(scope="session")
def cycle_model(write_ckpt):
    """(checkpoint path, model): the tiny preset trained for a few seconds on engine_helpers.CYCLE (main + MTP
    loss), saved in fp32 and loaded back, so speculative tests exercise the accept path, not only rejection."""
    from raymoe.platform.checkpoint import TinySpec, save_checkpoint
    from raymoe.platform.checkpoint.tiny import random_init
    from raymoe.platform.model.decoder import DeepseekV3ForCausalLM
    path = write_ckpt("cycle32", seed=2, dtype="float32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                     # a shared 2-core machine: one thread is the faster
    model = DeepseekV3ForCausalLM(TinySpec(seed=2, dtype="float32").config())
    random_init(model, 2)
    main, mtp = train_on_cycle(model)
    torch.set_num_threads(threads)
    assert main < 0.2 and mtp < 0.2, (main, mtp)
    save_checkpoint(model, path, dtype=torch.float32)
    return path, from_pretrained(path, dtype=torch.float32, device=DEVICE)


@pytest.fixture
def cycle_engine(cycle_model):
    """Factory: cycle_engine(k, **EngineConfig fields) -> an engine on the cycle model with k MTP drafts per step."""
    path, model = cycle_model

    def make(k: int, **kw) -> LLMEngine:
        kw.setdefault("num_blocks", 512)
        kw.setdefault("block_size", 4)
        return LLMEngine(EngineConfig(model=str(path), device=DEVICE, num_speculative_tokens=k, **kw), model=model)
    return make
