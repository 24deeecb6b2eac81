"""A 131,072-token prompt through chunked prefill equals a reference forward over the whole sequence.

Slow (minutes on CPU): `make test-slow`, or RAYMOE_TEST_DEVICE=cuda on a GPU machine.
"""
from __future__ import annotations

import os

import pytest
import torch

from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine import LLMEngine
from raymoe.platform.model import from_pretrained


@pytest.mark.slow
def test_131072_token_prompt_chunked_prefill(tiny_ckpt_fp32):
    device = os.environ.get("RAYMOE_TEST_DEVICE", "cpu")
    model = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32, device=device)
    n = 131072 - 1
    prompt = torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    eng = LLMEngine(EngineConfig(model=str(tiny_ckpt_fp32), device=device, block_size=64,
                                 num_blocks=131072 // 64 + 8, max_num_batched_tokens=4096), model=model)
    assert eng.max_model_len == 131072
    out = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0]["outputs"][0]
    with torch.no_grad():   # reference: contiguous latents, queries processed in bounded blocks (no paging)
        ref = torch.log_softmax(model(torch.tensor(prompt, device=device)[None], path="absorbed")[0, -1].float(), -1)
    top = ref.topk(5)
    got = out["logprobs"][0]["top"]
    assert [t for t, _ in got] == top.indices.tolist()
    assert max(abs(a - b) for (_, a), b in zip(got, top.values.tolist())) < 1e-3
    assert out["token_ids"] == [top.indices[0].item()]
    eng.blocks.check_no_leak()
