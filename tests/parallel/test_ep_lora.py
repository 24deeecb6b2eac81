"""Per-request LoRA adapters on routed experts that live on expert shards: a batch mixing four adapters (real PEFT
files, routed-expert targets) and the base over 2 shards gives the in-process multi-LoRA engine's greedy tokens and
log-probabilities with every transport (and under the compiled CPU step); adapters loaded while requests stream,
evicted and reloaded into another slot, a re-plan 2 -> 3 and a killed shard keep the tokens."""
from __future__ import annotations

import time

import pytest
import torch

from adapter_helpers import make_adapters
from ep_helpers import engine_config
from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine import LLMEngine
from raymoe.platform.parallel.plan import PlacementPlan

N_TOKENS = 6
# (targets, rank, alpha): every adapter reaches the routed experts, one of them nothing else
KINDS = {
    "all4": (["all"], 4, 8.0),
    "experts4": (["routed_experts"], 4, 8.0),
    "moe8": (["routed_experts", "shared_experts", "attention"], 8, 16.0),
    "all16": (["all"], 16, 8.0),
}


@pytest.fixture(scope="module")
def adapters(tiny_ckpt_fp32, tmp_path_factory):
    return make_adapters(tiny_ckpt_fp32, tmp_path_factory.mktemp("ep_adapters"), KINDS, first_seed=11)


@pytest.fixture(scope="module")
def ep_lora_prompts():
    g = torch.Generator().manual_seed(9)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 11, 3)]


def _params(adapter, n=N_TOKENS, logprobs=None):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, adapter=adapter, logprobs=logprobs)


def _jobs(prompts, adapters):
    return [(i, n) for i in range(len(prompts)) for n in [*adapters, None]]


def _engine(path, adapters, shards=0, transport="local", max_loras=4, engine=None, **parallel) -> LLMEngine:
    cfg = engine_config(path, shards, transport, **parallel)
    eng = LLMEngine(EngineConfig.model_validate({**cfg.model_dump(), "max_loras": max_loras, **(engine or {})}))
    for name, p in adapters.items():
        eng.load_adapter(name, str(p))
    return eng


@pytest.fixture(scope="module")
def reference(tiny_ckpt_fp32, adapters, ep_lora_prompts):
    """The in-process multi-LoRA engine (no shards): tokens and log-probabilities of every prompt x adapter."""
    eng = _engine(tiny_ckpt_fp32, adapters)
    jobs = _jobs(ep_lora_prompts, adapters)
    out = eng.generate([ep_lora_prompts[i] for i, _ in jobs], [_params(n, logprobs=3) for _, n in jobs])
    toks = {job: o["outputs"][0]["token_ids"] for job, o in zip(jobs, out)}
    lps = {job: o["outputs"][0]["logprobs"] for job, o in zip(jobs, out)}
    base = [toks[(0, n)] for n in [*adapters, None]]
    assert len({tuple(t) for t in base}) == len(base)       # every adapter changes the tokens, expert-only too
    return toks, lps


def _logprob_values(entries) -> torch.Tensor:
    """The chosen token's log-probability and the top ones of each position, as numbers."""
    vals = []
    for e in entries:
        vals += [float(v) for v in _numbers(e)]
    return torch.tensor(vals, dtype=torch.float64)


def _numbers(x):
    if isinstance(x, dict):
        for k in sorted(x, key=str):
            yield from _numbers(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, float):
        yield x


@pytest.mark.parametrize("transport,compiled", [("local", False), ("ray", False), ("collective", False),
                                                ("local", True)],
                         ids=["local", "ray", "collective", "local-cpu_compile"])
def test_mixed_adapters_over_two_shards_match_in_process(ray_cluster, tiny_ckpt_fp32, adapters, ep_lora_prompts,
                                                         reference, transport, compiled):
    toks, lps = reference
    kw = {"enforce_eager": False, "cpu_compile": True} if compiled else {}
    eng = _engine(tiny_ckpt_fp32, adapters, 2, transport, engine=kw)
    try:
        assert [m.experts.count for m in eng.model.moe_layers()] == [0] * len(eng.model.moe_layers())
        assert eng.model.row_lora.remote and not any(".experts." in n for n in eng.model.row_lora.stacks)
        jobs = _jobs(ep_lora_prompts, adapters)
        out = eng.generate([ep_lora_prompts[i] for i, _ in jobs], [_params(n, logprobs=3) for _, n in jobs])
        for job, o in zip(jobs, out):
            assert o["outputs"][0]["token_ids"] == toks[job], job
            got, want = _logprob_values(o["outputs"][0]["logprobs"]), _logprob_values(lps[job])
            assert got.shape == want.shape and (got - want).abs().max() <= 1e-4, job     # fp32 rounding
        if compiled:
            c = eng.runner.compiled
            assert c.failed is None and any(k[-1] for k in c.seen)      # adapter steps ran compiled
    finally:
        eng.close()


def test_replicated_experts_hold_the_adapters_too(tiny_ckpt_fp32, ref_model, adapters, ep_lora_prompts, reference,
                                                 tmp_path):
    """A balanced plan replicating hot experts on 3 in-process shards: every replica holds the adapters' factors of
    its experts (rows of a replicated expert are split over its replicas), and the tokens are the reference's."""
    toks, _ = reference
    loads = {m.layer: [float((e * 7 + m.layer) % 5 + 1) for e in range(16)] for m in ref_model.moe_layers()}
    plan = PlacementPlan.balanced(loads, num_shards=3, num_replicas=4)
    assert any(len(h) > 1 for layer in plan.layers for h in plan.holders(layer))
    plan.save(tmp_path / "plan.json")
    eng = _engine(tiny_ckpt_fp32, adapters, 3, "local", plan=str(tmp_path / "plan.json"))
    try:
        assert eng.ep.plan == plan
        jobs = _jobs(ep_lora_prompts, adapters)
        out = eng.generate([ep_lora_prompts[i] for i, _ in jobs], [_params(n) for _, n in jobs])
        assert [o["outputs"][0]["token_ids"] for o in out] == [toks[j] for j in jobs]
        main = {layer for layer, _ in eng.model.row_lora.remote.values()}           # not the MTP module's
        for sh, spec in zip(eng.ep.active.shards, plan.shards):        # every held expert got every slot
            assert set(sh.held_lora()) == set(eng.adapter_pool.slot_of.values())
            assert set(sh.lora.stacks) == {layer for layer, ids in spec.experts.items() if ids and layer in main}
            for layer, st in sh.lora.stacks.items():
                a = st["gate_up_proj"][0]
                a = a.view(4, -1, *a.shape[1:]).flatten(2)                # [slot, expert, R * in]
                assert bool((a.abs().sum(-1) > 0).all())                  # no (slot, expert) left without factors
    finally:
        eng.close()


def test_load_evict_reload_replan_while_streaming(ray_cluster, tiny_ckpt_fp32, adapters, ep_lora_prompts,
                                                  reference):
    """Two slots for four adapters over 2 Ray shards: an adapter loaded while requests stream, evictions and a
    reload into another slot, and a re-plan to 3 shards mid-stream; every request gets the reference tokens."""
    toks, _ = reference
    names = list(adapters)
    first = {n: adapters[n] for n in names[:2]}
    eng = _engine(tiny_ckpt_fp32, first, 2, "ray", max_loras=2)
    try:
        got: dict[tuple, list[int]] = {}

        def add(i, name):
            rid = f"{i}-{name}-{time.monotonic_ns()}"
            eng.add_request(rid, ep_lora_prompts[i], _params(name))
            got[rid] = (i, name)
            return rid

        out: dict[str, list[int]] = {}

        def step(k=1):
            for _ in range(k):
                for d in eng.step():
                    out.setdefault(d.request_id, []).extend(d.token_ids)

        a, b, c, d = names
        add(0, a)
        add(1, None)
        step(2)
        eng.load_adapter(c, str(adapters[c]))          # loaded while requests stream
        add(2, c)                                      # the second slot
        add(0, b)                                      # waits for a slot: evicts `a` once its request ends
        step(2)
        slot_a = eng.adapter_pool.slot_of[a]
        eng.ep.apply_plan(PlacementPlan.contiguous(3, eng.ep.plan.layers, 16))     # re-plan mid-stream
        assert len(eng.ep.active.actors) == 3
        while eng.has_unfinished():
            step()
        assert eng.adapter_pool.evictions >= 1 and a not in eng.adapter_pool.slot_of
        eng.load_adapter(d, str(adapters[d]))
        add(2, a)                                      # back, into the least recently used slot (c's)
        add(1, d)
        while eng.has_unfinished():
            step()
        assert eng.adapter_pool.slot_of[a] != slot_a                          # reloaded into the other slot
        for rid, job in got.items():
            assert out[rid] == toks[job], job
    finally:
        eng.close()


@pytest.mark.parametrize("transport", ["ray", "collective"])
def test_killed_shard_gets_its_adapters_back(ray_cluster, tiny_ckpt_fp32, adapters, ep_lora_prompts, reference,
                                             transport):
    """A shard killed (Ray restarts it: its experts reload, its adapter slots are empty) during an adapter
    request: the router re-sends the resident adapters' factors before retrying, so the tokens stay right. Killed
    once mid-step (the exchange fails) and once between steps (the restarted shard refuses the unknown slot)."""
    import ray
    toks, _ = reference
    sub = {n: adapters[n] for n in ("experts4", "all16")}
    eng = _engine(tiny_ckpt_fp32, sub, 2, transport, step_deadline_s=60.0)
    try:
        rids = {}
        for i, n in [(0, "experts4"), (1, "all16"), (2, None)]:
            rid = f"kill-{i}-{n}"
            eng.add_request(rid, ep_lora_prompts[i], _params(n, n=2 * N_TOKENS if n is None else N_TOKENS))
            rids[rid] = (i, n)
        out: dict[str, list[int]] = {}

        def step():
            for d in eng.step():
                out.setdefault(d.request_id, []).extend(d.token_ids)

        step()
        step()
        ray.kill(eng.ep.active.actors[1], no_restart=False)          # the next exchange fails: recover, re-send
        step()
        ray.kill(eng.ep.active.actors[0], no_restart=False)
        for _ in range(100):                                          # restarted before the next step
            try:
                if not ray.get(eng.ep.active.actors[0].held_lora.remote(), timeout=5):
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.GetTimeoutError):
                time.sleep(0.1)
        while eng.has_unfinished():
            step()
        for rid, (i, n) in rids.items():
            assert out[rid][:N_TOKENS] == toks[(i, n)], (i, n)
        held = ray.get([a.held_lora.remote() for a in eng.ep.active.actors])
        assert all(set(h) == set(eng.adapter_pool.slot_of.values()) for h in held)
    finally:
        eng.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_piecewise_graphs_with_adapters_on_shards_match_eager(tiny_ckpt_fp32, adapters, ep_lora_prompts):
    """Piecewise CUDA graphs over 2 shards with adapters: the exchanges between the replayed segments carry the
    slots of each replay (the graph's static slots input), so the tokens equal the eager engine's."""
    from raymoe.platform.engine.piecewise_graphs import PiecewiseGraph
    kw = dict(device="cuda", dtype="bfloat16", block_size=16, cuda_graph_sizes=[1, 2, 4, 8, 16])
    eager = _engine(tiny_ckpt_fp32, adapters, 2, "local", engine=kw)
    graphed = _engine(tiny_ckpt_fp32, adapters, 2, "local", engine={**kw, "enforce_eager": False},
                      piecewise_graphs=True)
    assert eager.runner.graphs is None and graphed.runner.graphs is not None
    jobs = _jobs(ep_lora_prompts, adapters)
    a = eager.generate([ep_lora_prompts[i] for i, _ in jobs], [_params(n, 8) for _, n in jobs])
    b = graphed.generate([ep_lora_prompts[i] for i, _ in jobs], [_params(n, 8) for _, n in jobs])
    ta = [o["outputs"][0]["token_ids"] for o in a]
    assert ta == [o["outputs"][0]["token_ids"] for o in b]
    by = dict(zip(jobs, ta))
    assert by[(0, "experts4")] != by[(0, None)]                   # the shards' adapters change the tokens
    keys = [k for k, (g, _) in graphed.runner.graphs.graphs.items() if isinstance(g, PiecewiseGraph)]
    assert any(k[-1] for k in keys)                              # adapter steps were replayed piecewise
