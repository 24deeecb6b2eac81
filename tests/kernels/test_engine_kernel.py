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
def models(tiny_ckpt_fp32):
    return {dt: from_pretrained(tiny_ckpt_fp32, dtype=dt, device="cuda") for dt in (torch.float32, torch.bfloat16)}


def _generate(model, path, eager: bool, k: int, use_kernel: bool) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    dtype = "float32" if next(model.parameters()).dtype == torch.float32 else "bfloat16"
    with kernels.set_enabled(use_kernel):
        eng = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype=dtype, num_blocks=256, block_size=16,
                                     enforce_eager=eager, cuda_graph_sizes=[1, 2, 4, 8], num_speculative_tokens=k),
                        model=model)
        out = [r["outputs"][0]["token_ids"] for r in eng.generate(_prompts(21, (5, 19, 33, 8, 12, 47)), params)]
        eng.blocks.check_no_leak()
        if not eager:
            assert eng.runner.graphs.graphs, "no CUDA graph was captured"
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
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
@pytest.mark.parametrize("k", [0, 2])
def test_engine_greedy_with_kernel_equals_without_fp32(tiny_ckpt_fp32, models, eager, k):
    """fp32 model and cache: the kernel (full-precision products) and the PyTorch path give the same tokens."""
    with_kernel = _generate(models[torch.float32], tiny_ckpt_fp32, eager, k, True)
    without = _generate(models[torch.float32], tiny_ckpt_fp32, eager, k, False)
    assert with_kernel == without


@needs_cuda
def test_bf16_decode_step_with_kernel_matches_without(models):
    """bf16: one decode step of the model over a random prefilled cache, kernel against PyTorch attention: the
    hidden states agree to bf16 rounding, and the argmax tokens agree on nearly all rows."""
    m = models[torch.bfloat16]
    cfg, bs, B, L = m.config, 16, 8, 77
    g = torch.Generator().manual_seed(5)
    caches = [torch.randn(B * 5 + 1, bs, cfg.latent_dim, generator=g).to(torch.bfloat16).cuda()
              for _ in range(m.num_cache_layers)]
    tables = torch.randperm(B * 5, generator=g).view(B, 5).cuda()
    lens = torch.full((B,), L, dtype=torch.long, device="cuda")
    slots = tables[:, (L - 1) // bs] * bs + (L - 1) % bs
    ids = torch.randint(0, 1000, (B,), generator=g).cuda()
    pos = torch.full((B,), L - 1, dtype=torch.long, device="cuda")
    outs = []
    for on in (True, False):
        with kernels.set_enabled(on), torch.no_grad():
            meta = PagedAttention.uniform(slots, tables, lens, 1, bs)
            outs.append(m.forward_cached(ids, pos, [c.clone() for c in caches], meta).float())
    err = ((outs[0] - outs[1]).norm() / outs[1].norm()).item()
    assert err < 2e-2, err
    la, lb = m.compute_logits(outs[0].to(torch.bfloat16)), m.compute_logits(outs[1].to(torch.bfloat16))
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean().item() >= 0.75
