"""Per-request LoRA adapters in the engine: a batch mixing four adapters (PEFT files, routed-expert targets among
them) and the base model gives each row the greedy tokens of the model with only its adapter merged (fp32), eager
and compiled; the prefix cache is never shared across adapters; more adapters than device slots are served
through eviction; broken and unknown adapters are refused with a clear error; an unload waits for its requests."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine import AdapterInvalid, AdapterNotFound, LLMEngine
from raymoe.platform.model import from_pretrained
from engine_helpers import greedy_reference, prompts
from lora_helpers import KINDS, make_adapter, make_adapters, merged_model

DEVICE = os.environ.get("RAYMOE_TEST_DEVICE", "cpu")

N_TOKENS = 6


@pytest.fixture(scope="module")
def adapters(tiny_ckpt_fp32, tmp_path_factory):
    return make_adapters(tiny_ckpt_fp32, tmp_path_factory.mktemp("adapters"), KINDS, first_seed=1)


@pytest.fixture(scope="module")
def references(tiny_ckpt_fp32, adapters):
    """Greedy tokens of each prompt under each adapter merged (None: the base), by full recompute: the truth."""
    ps = prompts(7, [5, 9, 7, 12, 6, 11])
    refs = {}
    for name in [*adapters, None]:
        model = merged_model(tiny_ckpt_fp32, adapters.get(name))
        refs[name] = [greedy_reference(model, p, N_TOKENS) for p in ps]
    return ps, refs


@pytest.fixture
def lora_engine(tiny_ckpt_fp32):
    """Engines on their own model (loading adapters adds LoRA stacks to the model they run)."""
    def make(**kw) -> LLMEngine:
        kw.setdefault("num_blocks", 256)
        kw.setdefault("block_size", 4)
        model = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32)
        return LLMEngine(EngineConfig(model=str(tiny_ckpt_fp32), **kw), model=model)
    return make


def _greedy(adapter):
    return SamplingParams(max_tokens=N_TOKENS, temperature=0, adapter=adapter)


def _tokens(out):
    return [o["outputs"][0]["token_ids"] for o in out]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "cpu_compile"])
def test_mixed_batch_matches_merged_models(lora_engine, adapters, references, compiled):
    ps, refs = references
    names = [*adapters, None]
    assert len({tuple(refs[n][0]) for n in names}) == len(names)      # every adapter changes the tokens
    eng = lora_engine(cpu_compile=compiled, max_loras=4)
    for name, path in adapters.items():
        info = eng.load_adapter(name, str(path))
        assert info["name"] == name and info["rank"] == KINDS[name][1]
    assert eng.adapters() == sorted(adapters)
    # every prompt under every adapter and the base, all in one batch (and decode steps that mix them)
    jobs = [(p, i, n) for i, p in enumerate(ps) for n in names]
    out = eng.generate([p for p, _, _ in jobs], [_greedy(n) for _, _, n in jobs])
    for (p, i, n), toks in zip(jobs, _tokens(out)):
        assert toks == refs[n][i], (n, i)
    if compiled:
        assert eng.runner.compiled.failed is None and any(k[-1] for k in eng.runner.compiled.seen)
    stats = eng.stats()["adapters"]
    assert stats["loads"] == 4 and stats["evictions"] == 0 and sorted(stats["resident"]) == sorted(adapters)


def test_adapter_loaded_after_compilation_is_seen(lora_engine, adapters, references):
    """The compiled step keeps the LoRA stacks as inputs, not constants: an adapter loaded (copied into a slot)
    after graphs exist changes the tokens."""
    ps, refs = references
    eng = lora_engine(cpu_compile=True, max_loras=2)
    eng.load_adapter("all4", str(adapters["all4"]))
    assert _tokens(eng.generate(ps[:2], _greedy("all4"))) == refs["all4"][:2]
    eng.unload_adapter("all4")
    eng.load_adapter("all16", str(adapters["all16"]))         # the same slot, new factors
    assert _tokens(eng.generate(ps[:2], _greedy("all16"))) == refs["all16"][:2]
    assert _tokens(eng.generate(ps[:2], _greedy(None))) == refs[None][:2]


def test_prefix_cache_is_never_shared_across_adapters(lora_engine, adapters):
    eng = lora_engine(max_loras=2)
    for name in ("all4", "attn8"):
        eng.load_adapter(name, str(adapters[name]))
    prompt = prompts(3, [21])[0]                               # five full blocks of 4
    first = _tokens(eng.generate([prompt], _greedy("all4")))
    hits = eng.blocks.prefix_hits
    other = _tokens(eng.generate([prompt], _greedy("attn8")))
    base = _tokens(eng.generate([prompt], _greedy(None)))
    assert eng.blocks.prefix_hits == hits                      # same tokens, other adapter or base: no hit
    assert _tokens(eng.generate([prompt], _greedy("all4"))) == first
    assert eng.blocks.prefix_hits == hits + 1                  # same adapter: its blocks are reused
    model_ref = {n: greedy_reference(merged_model(eng.cfg.model, adapters.get(n)), prompt, N_TOKENS)
                 for n in ("attn8", None)}
    assert other == [model_ref["attn8"]] and base == [model_ref[None]]
    # a reloaded adapter of the same name is another adapter: its blocks are not the old one's
    eng.unload_adapter("all4")
    eng.load_adapter("all4", str(adapters["all16"]))
    hits = eng.blocks.prefix_hits
    eng.generate([prompt], _greedy("all4"))
    assert eng.blocks.prefix_hits == hits


def test_more_adapters_than_slots_through_eviction(lora_engine, adapters, references):
    ps, refs = references
    eng = lora_engine(max_loras=2, max_cpu_loras=1)
    for name, path in adapters.items():
        eng.load_adapter(name, str(path))
    names = [*adapters, None]
    jobs = [(p, i, n) for i, p in enumerate(ps[:3]) for n in names]
    out = eng.generate([p for p, _, _ in jobs], [_greedy(n) for _, _, n in jobs])
    for (p, i, n), toks in zip(jobs, _tokens(out)):
        assert toks == refs[n][i], (n, i)
    stats = eng.stats()["adapters"]
    assert stats["evictions"] >= 2 and len(stats["resident"]) <= 2
    assert stats["disk_reads"] >= 1                             # beyond max_cpu_loras: read again from disk
    # one at a time, round robin: every switch evicts the least recently used
    for n in names + names:
        assert _tokens(eng.generate([ps[0]], _greedy(n))) == [refs[n][0]]


def test_broken_adapters_are_invalid(lora_engine, adapters, write_ckpt, tmp_path):
    eng = lora_engine(max_lora_rank=8)
    with pytest.raises(AdapterInvalid, match="needs adapter_config.json and adapter_model.safetensors"):
        eng.load_adapter("empty", str(tmp_path))
    missing = shutil.copytree(adapters["all4"], tmp_path / "missing")
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterInvalid, match="'missing'.*not a PEFT adapter"):
        eng.load_adapter("missing", str(missing))
    with pytest.raises(AdapterInvalid, match="rank 16 .* above max_lora_rank 8"):
        eng.load_adapter("big", str(adapters["all16"]))
    other = write_ckpt("lora_other_base", preset="vllm", seed=1, dtype="float32")   # hidden 256, not 64
    wrong = make_adapter(other, tmp_path / "other", ["attention"], 4, 8.0, seed=1)
    with pytest.raises(AdapterInvalid, match="fits LoRA factors"):
        eng.load_adapter("other", str(wrong))
    cfg = json.loads((adapters["attn8"] / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    dora = shutil.copytree(adapters["attn8"], tmp_path / "dora")
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterInvalid, match="use_dora"):
        eng.load_adapter("dora", str(dora))
    eng.load_adapter("ok", str(adapters["all4"]))
    with pytest.raises(AdapterInvalid, match="already loaded"):
        eng.load_adapter("ok", str(adapters["all4"]))
    assert eng.adapters() == ["ok"]                            # nothing half-loaded


def test_unknown_adapter_is_not_found(lora_engine, adapters):
    eng = lora_engine()
    with pytest.raises(AdapterNotFound, match="'nope' is not loaded"):
        eng.add_request("r", [5, 6, 7], _greedy("nope"))
    with pytest.raises(AdapterNotFound):
        eng.validate([5, 6, 7], _greedy("nope"))
    with pytest.raises(AdapterNotFound):
        eng.unload_adapter("nope")
    assert not eng.has_unfinished() and not eng.requests


def test_unload_waits_for_running_requests(lora_engine, adapters, references):
    ps, refs = references
    eng = lora_engine(max_loras=2)
    eng.load_adapter("attn8", str(adapters["attn8"]))
    eng.add_request("r", ps[0], _greedy("attn8"))
    got = []
    for d in eng.step():
        got += d.token_ids
    eng.unload_adapter("attn8")                                # mid-request
    assert eng.adapters() == []
    with pytest.raises(AdapterNotFound):
        eng.add_request("s", ps[1], _greedy("attn8"))
    eng.load_adapter("all4", str(adapters["all4"]))            # loading never touches the running request
    eng.add_request("t", ps[1], _greedy("all4"))
    tok = {"r": got, "t": []}
    while eng.has_unfinished():
        for d in eng.step():
            tok[d.request_id] += d.token_ids
    assert tok["r"] == refs["attn8"][0] and tok["t"] == refs["all4"][1]
    assert "attn8" not in eng.adapter_pool.adapters             # gone once its last request finished
    eng.blocks.check_no_leak()


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU (RAYMOE_TEST_DEVICE=cuda)")
def test_cuda_graphs_serve_mixed_adapters(tiny_ckpt_fp32, adapters):
    """bf16 on the GPU: the captured decode steps (slot ids a static input, stacks preallocated) give the tokens of
    the eager engine for every row of a mixed batch, and an adapter loaded after capture is seen."""
    ps = prompts(9, [5, 8, 6, 9, 7])
    names = ["all4", "attn8", "experts4", "all16", None]
    runs = {}
    for eager in (True, False):
        model = from_pretrained(tiny_ckpt_fp32, dtype=torch.bfloat16, device="cuda")
        eng = LLMEngine(EngineConfig(model=str(tiny_ckpt_fp32), device="cuda", num_blocks=256, block_size=4,
                                     enforce_eager=eager, max_loras=4), model=model)
        eng.load_adapter("all4", str(adapters["all4"]))
        first = _tokens(eng.generate(ps[:1], _greedy("all4")))          # graphs exist before the others load
        for n in names[1:4]:
            eng.load_adapter(n, str(adapters[n]))
        runs[eager] = first + _tokens(eng.generate(ps, [_greedy(n) for n in names]))
        if not eager:
            assert any(k[-1] for k in eng.runner.graphs.graphs)        # a LoRA graph was captured and replayed
    assert runs[False] == runs[True]
    assert len({tuple(t) for t in runs[True][1:]}) == len(names)

