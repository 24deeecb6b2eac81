"""Expert parallelism on a real local Ray cluster: every transport and shard count gives the single-process tokens
and logits; balanced plans with replicas; a router that holds no routed expert; shards read only their experts."""
from __future__ import annotations

import pytest
import torch

from ep_helpers import engine_config
from raymoe.platform.checkpoint.keymap import parse_expert_key
from raymoe.platform.config import SamplingParams
from raymoe.platform.engine import LLMEngine
from raymoe.platform.parallel.plan import PlacementPlan

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _check_engine(eng: LLMEngine, ref_model, ep_prompts, reference_tokens) -> None:
    out = eng.generate(ep_prompts, GREEDY)
    assert [o["outputs"][0]["token_ids"] for o in out] == reference_tokens
    ids = torch.tensor([ep_prompts[2][:16], ep_prompts[2][1:17]])
    with torch.no_grad():
        assert _rel(eng.model(ids), ref_model(ids)) <= 1e-5      # fp32 rounding: partial sums added per shard
        single = torch.tensor([ep_prompts[0]])                     # one token: at most 2 of 4 expert groups
        assert _rel(eng.model(single), ref_model(single)) <= 1e-5


@pytest.mark.parametrize("transport", ["local", "ray", "collective"])
@pytest.mark.parametrize("shards", [1, 2, 4])
def test_transports_match_single_process(ray_cluster, tiny_ckpt_fp32, ref_model, ep_prompts, reference_tokens,
                                         transport, shards):
    eng = LLMEngine(engine_config(tiny_ckpt_fp32, shards, transport))
    try:
        router_experts = [m.experts.count for m in eng.model.moe_layers()]
        assert router_experts == [0] * len(router_experts)           # the router holds no routed expert
        assert len(eng.ep.plan.shards) == shards
        _check_engine(eng, ref_model, ep_prompts, reference_tokens)
        if shards == 4:           # a one-token step leaves some shards without rows (n_group 4, topk_group 2)
            moe = eng.model.moe_layers()[0]
            with torch.no_grad():
                x = eng.model.model.embed_tokens(torch.tensor(ep_prompts[0]))
                ids, _, _ = moe.gate(x)
            owners = set(eng.ep.routing.shard_of(moe.layer, ids).flatten().tolist())
            assert len(owners) < 4
    finally:
        eng.close()


def test_balanced_plan_with_replicas_matches(ray_cluster, tiny_ckpt_fp32, ref_model, ep_prompts, reference_tokens,
                                             tmp_path):
    eng = LLMEngine(engine_config(tiny_ckpt_fp32), model=ref_model)
    eng.generate(ep_prompts, GREEDY)
    loads = eng.expert_load()
    assert all(sum(c) > 0 for layer, c in loads.items() if layer < ref_model.config.num_hidden_layers)
    plan = PlacementPlan.balanced({l: [float(x) + 1 for x in c] for l, c in loads.items()}, num_shards=3,
                                  num_replicas=4)
    assert any(len(h) > 1 for layer in plan.layers for h in plan.holders(layer))     # replicated experts
    path = tmp_path / "plan.json"
    plan.save(path)
    for transport in ("local", "ray"):
        sharded = LLMEngine(engine_config(tiny_ckpt_fp32, 3, transport, plan=str(path)))
        try:
            assert sharded.ep.plan == plan
            _check_engine(sharded, ref_model, ep_prompts, reference_tokens)
        finally:
            sharded.close()


def test_shards_read_only_their_experts(ray_cluster, tiny_ckpt_fp32):
    eng = LLMEngine(engine_config(tiny_ckpt_fp32, 2, "ray"))
    try:
        for shard, keys in zip(eng.ep.plan.shards, eng.ep.keys_read()):
            want = {(layer, e) for layer, ids in shard.experts.items() for e in ids}
            got = {}
            for key in keys:
                parsed = parse_expert_key(key)
                assert parsed is not None, f"a shard read {key}, not an expert tensor"
                prefix, e, _ = parsed
                got.setdefault((int(prefix.split(".")[2]), e), set()).add(key)
            assert set(got) == want
            assert all(len(v) == 3 for v in got.values())        # gate, up, down of each expert, once
    finally:
        eng.close()


def test_expert_load_and_balance_report(ray_cluster, tiny_ckpt_fp32, ep_prompts):
    eng = LLMEngine(engine_config(tiny_ckpt_fp32, 2, "local"))
    try:
        out = eng.generate(ep_prompts, GREEDY)
        loads = eng.expert_load()
        k = eng.model.config.num_experts_per_tok
        computed = sum(len(p) for p in ep_prompts) + sum(len(o["outputs"][0]["token_ids"]) - 1 for o in out)
        for layer in eng.ep.plan.layers:
            if layer < eng.model.config.num_hidden_layers:       # every token computed passes every MoE layer
                assert sum(loads[layer]) == computed * k
        report = eng.expert_balance()
        per_shard = eng.ep.plan.shard_load(loads)
        for layer, bal in report.layers.items():
            if sum(loads[layer]):
                assert bal.shard_ratio == pytest.approx(max(per_shard[layer]) / (sum(per_shard[layer]) / 2))
        assert "layer" in report.table()
    finally:
        eng.close()


def test_remote_experts_are_never_graphed_on_cpu(tiny_ckpt_fp32):
    eng = LLMEngine(engine_config(tiny_ckpt_fp32, 2, "local").model_copy(update={"enforce_eager": False}))
    assert eng.model.remote_experts() and eng.runner.graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_piecewise_graphs_with_remote_experts_match_eager(tiny_ckpt_fp32):
    from raymoe.platform.config import EngineConfig, ParallelConfig
    from raymoe.platform.engine.cuda_graphs import DecodeGraphs
    from raymoe.platform.engine.piecewise_graphs import PiecewiseGraph
    kw = dict(model=str(tiny_ckpt_fp32), device="cuda", dtype="bfloat16", num_blocks=256, block_size=16,
              cuda_graph_sizes=[1, 2, 4])
    eager = LLMEngine(EngineConfig(**kw, parallel=ParallelConfig(num_shards=2, transport="local",
                                                                 piecewise_graphs=False)))
    graphed = LLMEngine(EngineConfig(**kw, parallel=ParallelConfig(num_shards=2, transport="local",
                                                                   piecewise_graphs=True)))
    assert eager.runner.graphs is None and graphed.runner.graphs is not None
    # a whole-step capture refuses a model with remote experts, and the remote call refuses any capture
    with pytest.raises(RuntimeError, match="refusing to capture"):
        DecodeGraphs(eager.model, eager.runner.caches, 16, [1], scratch_block=0, max_blocks=8)._capture(
            False, 1, 1, 8, False)
    moe = graphed.model.moe_layers()[0]
    cfg = graphed.model.config
    x = torch.zeros(1, cfg.hidden_size, dtype=torch.bfloat16, device="cuda")
    ids = torch.zeros(1, cfg.num_experts_per_tok, dtype=torch.long, device="cuda")
    w = torch.zeros(1, cfg.num_experts_per_tok, device="cuda")
    with pytest.raises(RuntimeError, match="cannot be captured"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            moe.dispatch.send(moe.layer, x, ids, w)
    prompts = [[5, 6, 7], [9] * 20, list(range(3, 40))]
    a = eager.generate(prompts, GREEDY)
    b = graphed.generate(prompts, GREEDY)
    assert [o["outputs"][0]["token_ids"] for o in a] == [o["outputs"][0]["token_ids"] for o in b]
    pieces = [g for g, _ in graphed.runner.graphs.graphs.values()]
    assert pieces and all(isinstance(g, PiecewiseGraph) for g in pieces)        # decode steps replayed them
    main_moe = sum(1 for layer in graphed.model.model.layers if layer.mlp in graphed.model.moe_layers())
    assert all(g.segments == 2 * main_moe + 1 for g in pieces)     # per MoE layer: to the send, shared expert


def test_cli_generate_with_expert_shards(tiny_ckpt_fp32):
    import subprocess
    import sys
    from pathlib import Path
    exe = Path(sys.executable).parent / "raymoe"
    base = [str(exe), "generate", "--model", str(tiny_ckpt_fp32), "--prompt", "Hello there", "--max-tokens", "8"]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=300)
    sharded = subprocess.run(base + ["--ep", "2", "--transport", "local", "--balance"], capture_output=True,
                             text=True, timeout=300)
    assert plain.returncode == 0 and sharded.returncode == 0, sharded.stderr[-2000:]
    assert plain.stdout == sharded.stdout and plain.stdout.strip()
    assert "shard max/mean" in sharded.stderr
    bad = subprocess.run(base + ["--ep", "2", "--transport", "pigeon"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: invalid transport")
