"""Expert-parallel fixtures: the fp32 tiny checkpoint, its single-process reference, and engine/config builders."""
from __future__ import annotations

import pytest
import torch

from ep_helpers import engine_config
from raymoe.platform.engine import LLMEngine
from raymoe.platform.model import from_pretrained


@pytest.fixture(autouse=True, scope="module")
def _one_thread_here(one_thread):
    """Every expert-parallel test runs the router (this process) on one intra-op thread, as each shard does."""
    yield


@pytest.fixture(scope="session")
def ref_model(tiny_ckpt_fp32):
    return from_pretrained(tiny_ckpt_fp32, dtype=torch.float32)


@pytest.fixture(scope="session")
def ep_prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (1, 7, 19)]


@pytest.fixture(scope="session")
def reference_tokens(tiny_ckpt_fp32, ref_model, ep_prompts):
    from raymoe.platform.config import SamplingParams
    eng = LLMEngine(engine_config(tiny_ckpt_fp32), model=ref_model)
    out = eng.generate(ep_prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    return [o["outputs"][0]["token_ids"] for o in out]
