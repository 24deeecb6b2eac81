"""The engine with the paged MLA decode kernel: greedy tokens equal the engine without it (PyTorch attention), eager
and through CUDA graphs, for plain decode and MTP verification; the kernel really serves those batches."""
from __future__ import annotations

import pytest
import torch

from raymoe.platform import kernels
from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine import LLMEngine
from raymoe.platform.model import PagedAttention, from_pretrained
from raymoe.platform.model.attention import kernel_query_len
from kernel_helpers import needs_cuda


def _prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model_bf16(tiny_ckpt):
    return from_pretrained(tiny_ckpt, dtype=torch.bfloat16, device="cuda")


def _generate(model, path, eager: bool, k: int, use_kernel: bool) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with kernels.set_enabled(use_kernel):
        eng = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="bfloat16", num_blocks=256, block_size=16,
                                     enforce_eager=eager, cuda_graph_sizes=[1, 2, 4, 8], num_speculative_tokens=k),
                        model=model)
        out = [r["outputs"][0]["token_ids"] for r in eng.generate(_prompts(21, (5, 19, 33, 8, 12, 47)), params)]
        eng.blocks.check_no_leak()
    return out


@needs_cuda
def test_kernel_serves_decode_and_mtp_batches():
    q = torch.zeros(6, 4, 48, dtype=torch.bfloat16, device="cuda")
    cache = torch.zeros(8, 16, 48, dtype=torch.bfloat16, device="cuda")
    tables = torch.zeros(3, 2, dtype=torch.long, device="cuda")
    lens = torch.full((3,), 20, dtype=torch.long, device="cuda")
    slots = torch.zeros(6, dtype=torch.long, device="cuda")
    meta = PagedAttention.uniform(slots, tables, lens, 2, 16)
    assert kernel_query_len(q, cache, meta) == 2
    assert kernel_query_len(q.float(), cache.float(), meta) is None          # fp32 caches keep the PyTorch path
    with kernels.set_enabled(False):
        assert kernel_query_len(q, cache, meta) is None


@needs_cuda
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
@pytest.mark.parametrize("k", [0, 2])
def test_engine_greedy_with_kernel_equals_without(tiny_ckpt, model_bf16, eager, k):
    with_kernel = _generate(model_bf16, tiny_ckpt, eager, k, True)
    without = _generate(model_bf16, tiny_ckpt, eager, k, False)
    same = sum(a == b for x, y in zip(with_kernel, without) for a, b in zip(x, y))
    total = sum(len(x) for x in without)
    assert with_kernel == without, f"{same}/{total} tokens equal"
