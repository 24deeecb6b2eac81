"""Expert kernels agree (grouped GEMM, gathered small-batch, dense, padded, per-expert loop); CUDA-graph decode
equals eager.

The grouped path is checked on any machine (torch's CPU fallback of _grouped_mm); the CUDA-graph test needs a GPU.
"""
from __future__ import annotations

import pytest
import torch

from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine import LLMEngine
from raymoe.platform.model import from_pretrained
from engine_helpers import prompts


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_grouped_experts_equal_loop(tiny_ckpt_fp32):
    cpu = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32)
    experts = cpu.model.layers[1].mlp.experts
    gate = cpu.model.layers[1].mlp.gate
    x = torch.randn(37, cpu.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids, w, _ = gate(x)
        ref = experts._loop(x, ids, w)
        got = experts._grouped(x, ids, w)
        few = experts._gathered(x[:3], ids[:3], w[:3])
        padded = experts._padded(x, ids, w)
        dense = experts._dense(x, ids, w)
        no_one = experts._dense(x, torch.where(ids == ids[:, :1], -1, ids), w)    # an id -1 adds nothing
        auto = experts(x, ids, w)
    assert (padded - ref).abs().max() < 1e-5
    assert (dense - ref).abs().max() < 1e-5
    assert (no_one - experts._loop(x, torch.where(ids == ids[:, :1], -1, ids), w)).abs().max() < 1e-5
    with torch.no_grad():                      # id -1 through the grouped GEMM, every expert held here: rows past the
        some = torch.where(ids == ids[:, :1], -1, ids)         # last group are masked, never combined undefined
        grouped_no_one = experts._grouped(x, some, torch.full_like(w, float("nan")).where(some < 0, w))
    assert (grouped_no_one - experts._loop(x, some, w)).abs().max() < 1e-5
    # the tiny preset: 16 experts, 4 per token, so every expert on every token is 4x the work: dense past 16 pairs
    assert [experts.inference_path(n, 4) for n in (1, 4, 5, 37)] == ["gathered", "gathered", "dense", "dense"]
    assert experts.inference_path(37, 4, per_row_lora=True) == "dense"        # per-row LoRA: each pair's factors
    assert experts.inference_path(300, 4, per_row_lora=True) == "padded"      # past GATHER_LORA_PAIRS pairs
    assert torch.equal(auto, dense)
    assert (got - ref).abs().max() < 1e-5
    assert (few - ref[:3]).abs().max() < 1e-5
    with torch.no_grad():    # a shard holding experts 4..11 only: the other rows contribute nothing
        from raymoe.platform.model import RoutedExperts
        part = RoutedExperts(cpu.config, 4, 8)
        part.gate_up_proj.copy_(experts.gate_up_proj[4:12])
        part.down_proj.copy_(experts.down_proj[4:12])
        assert (part._grouped(x, ids, w) - part._loop(x, ids, w)).abs().max() < 1e-5
        assert (part._padded(x, ids, w) - part._loop(x, ids, w)).abs().max() < 1e-5
        assert part.inference_path(37, 4) == "padded"                  # dense and gathered need every expert


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_per_row_expert_lora_paths_agree(tiny_ckpt_fp32):
    """Per-row adapters on routed experts (slots; -1 = base): CPU inference gathers each (token, expert) pair's
    factors in the padded, gathered and dense paths; they equal the grouped GEMM over (slot, expert) groups, also on
    a shard holding some of the experts; forward() on a decode-sized batch gives the same."""
    from raymoe.platform.model import RoutedExperts
    from raymoe.platform.model.moe import ExpertLora
    cpu = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32)
    experts = cpu.model.layers[1].mlp.experts
    gate = cpu.model.layers[1].mlp.gate
    g = torch.Generator().manual_seed(3)
    N, S, R = 37, 3, 8
    x = torch.randn(N, cpu.config.hidden_size, generator=g)
    slots = torch.randint(-1, S, (N,), generator=g)

    def stacks(ex: RoutedExperts) -> dict[str, ExpertLora]:
        out = {}
        for name in ("gate_up_proj", "down_proj"):
            _, o, i = getattr(ex, name).shape
            out[name] = ExpertLora(torch.randn(S * ex.count, R, i, generator=g) * 0.2,
                                   torch.randn(S * ex.count, o, R, generator=g) * 0.2, 1.0, slots)
        return out

    with torch.no_grad():
        ids, w, _ = gate(x)
        lora = stacks(experts)
        ref = experts._grouped(x, ids, w, lora)
        assert (ref - experts._grouped(x, ids, w)).abs().max() > 1e-3          # the adapters change the output
        assert (experts._padded(x, ids, w, lora) - ref).abs().max() < 1e-5
        few = {n: ExpertLora(f.a, f.b, f.scale, slots[:3]) for n, f in lora.items()}
        assert (experts._gathered(x[:3], ids[:3], w[:3], few) - experts._grouped(x[:3], ids[:3], w[:3], few)
                ).abs().max() < 1e-5
        assert (experts._dense(x, ids, w, lora) - ref).abs().max() < 1e-5
        assert (experts(x, ids, w, lora=lora) - ref).abs().max() < 1e-5         # forward: the dense path
        gone = torch.where(ids == ids[:, :1], -1, ids)                           # an id -1 adds nothing, LoRA too
        assert (experts._dense(x, gone, w, lora) - experts._loop(x, gone, w, lora)).abs().max() < 1e-5
        part = RoutedExperts(cpu.config, 4, 8)
        part.gate_up_proj.copy_(experts.gate_up_proj[4:12])
        part.down_proj.copy_(experts.down_proj[4:12])
        plora = stacks(part)
        assert (part._padded(x, ids, w, plora) - part._grouped(x, ids, w, plora)).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_eager(tiny_ckpt):
    eager, graphs = _eager_and_graphs(tiny_ckpt, prompts(12, (5, 19, 33, 8, 12)))
    assert eager[0] == graphs[0]
    assert graphs[1].runner.graphs.graphs and eager[1].runner.graphs is None   # captured and replayed


def _eager_and_graphs(tiny_ckpt, ps: list[list[int]], k: int = 0):
    """Greedy tokens of ps from an eager engine and from one with CUDA graphs: ((tokens, engine), (tokens, engine))."""
    model = from_pretrained(tiny_ckpt, dtype=torch.bfloat16, device="cuda")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    runs = []
    for eager in (True, False):
        eng = LLMEngine(EngineConfig(model=str(tiny_ckpt), device="cuda", dtype="bfloat16", num_blocks=256,
                                     block_size=16, enforce_eager=eager, cuda_graph_sizes=[1, 2, 4, 8],
                                     num_speculative_tokens=k), model=model)
        runs.append(([r["outputs"][0]["token_ids"] for r in eng.generate(ps, params)], eng))
        eng.blocks.check_no_leak()
    return runs[0], runs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("k", [1, 2])
def test_cuda_graph_mtp_steps_equal_eager(tiny_ckpt, k):
    """With MTP, verification (q = k + 1) and drafting steps replay graphs too; tokens equal the eager engine's."""
    eager, graphs = _eager_and_graphs(tiny_ckpt, prompts(13, (5, 19, 33, 8, 12)), k)
    assert eager[0] == graphs[0]
    kinds = {(key[0], key[1]) for key in graphs[1].runner.graphs.graphs}     # key: (mtp, q, B, W, lora)
    assert (False, k + 1) in kinds and (True, k + 1) in kinds, kinds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_experts_backward_matches_loop_on_cuda(tiny_ckpt_fp32):
    """Training runs the grouped GEMM too: its gradients equal the per-expert loop's (bf16 tolerance)."""
    m = from_pretrained(tiny_ckpt_fp32, dtype=torch.bfloat16, device="cuda")
    experts, gate = m.model.layers[1].mlp.experts, m.model.layers[1].mlp.gate
    x = torch.randn(64, m.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    ids, w, _ = gate(x)
    grads = []
    for fn in (experts._grouped, experts._loop):
        xi = x.clone().requires_grad_(True)
        experts.zero_grad()
        out = fn(xi, ids, w.detach())
        out.float().pow(2).sum().backward()
        grads.append((out.detach().float(), xi.grad.float(), experts.gate_up_proj.grad.float()))
    for a, b in zip(*grads):
        assert ((a - b).norm() / b.norm()) < 2e-2
