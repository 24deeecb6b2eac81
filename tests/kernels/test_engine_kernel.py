"""The engine with the paged MLA decode kernel: greedy tokens equal the engine without it (PyTorch attention) for plain
decode and MTP verification; the kernel really serves those batches and not prefill chunks."""
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
def models(tiny_ckpt_fp32):
    return {torch.float32: from_pretrained(tiny_ckpt_fp32, dtype=torch.float32, device="cuda")}


def _generate(model, path, eager: bool, k: int, use_kernel: bool) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    dtype = "float32" if next(model.parameters()).dtype == torch.float32 else "bfloat16"
    with kernels.set_enabled(use_kernel):
        eng = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype=dtype, num_blocks=256, block_size=16,
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
    long_chunk = PagedAttention.uniform(torch.zeros(60, dtype=torch.long, device="cuda"), tables, lens, 20, 16)
    assert kernel_query_len(q, cache, long_chunk) is None                   # prefill chunks: the PyTorch path
    with kernels.set_enabled(False):
        assert kernel_query_len(q, cache, meta) is None


@needs_cuda
@pytest.mark.parametrize("k", [0, 2])
def test_engine_greedy_with_kernel_equals_without_fp32(tiny_ckpt_fp32, models, k):
    """fp32 model and cache (eager: CUDA graphs are captured for bf16 models only, and tests/engine/test_gpu_paths.py
    checks those, kernel included, against eager): the kernel with full-precision products and the PyTorch path
    give the same greedy tokens, plain decode and MTP verification. (In bf16 the two differ by rounding, which flips
    the tiny model's near-tied expert choices within a few tokens, as bf16 does against fp32 for any attention; the
    kernel's bf16 accuracy is checked against an fp32 truth in test_mla_decode.py.)"""
    with_kernel = _generate(models[torch.float32], tiny_ckpt_fp32, True, k, True)
    without = _generate(models[torch.float32], tiny_ckpt_fp32, True, k, False)
    assert with_kernel == without
