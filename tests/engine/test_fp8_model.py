"""FP8 weights kept in FP8 (EngineConfig.quantization): an FP8 tiny checkpoint loaded with `fp8` holds float8 weights
with their block scales and computes the same logits and greedy tokens as the same checkpoint dequantised at load
(`none`) — exactly in fp32 on the CPU, where the FP8 forward dequantises per call; `auto` dequantises on the CPU;
expert shards and multi-LoRA compose; dummy+fp8 makes FP8 weights of the real shapes; bad combinations fail clearly.

On a GPU (with Triton) the Triton FP8 GEMMs serve the same model: logits within FP8/bf16 error
of the dequantised path, greedy tokens agreeing on most steps (the agreement is printed), CUDA graphs equal eager
(MTP and multi-LoRA too). The kernel paths of the model also run on the CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from raymoe.platform import kernels
from raymoe.platform.checkpoint import CheckpointError, load_model
from raymoe.platform.checkpoint.experts import load_experts
from raymoe.platform.config import EngineConfig, ModelConfig, SamplingParams
from raymoe.platform.engine import LLMEngine
from raymoe.platform.model.fp8 import FP8_DTYPE, Fp8Linear, fp8_linear_names, holds_fp8
from raymoe.platform.model.multi_lora import LoraFp8Linear
from engine_helpers import greedy_margins, greedy_reference, prompts
from lora_helpers import make_adapter

DEVICE = os.environ.get("RAYMOE_TEST_DEVICE", "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not kernels.triton_available(),
                                reason="the Triton FP8 path needs a CUDA GPU with Triton")
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# Dims where the FP8 blocks matter: several 128 x 128 blocks per matrix, moe_intermediate_size % 128 == 0 (gate and
# up in one grouped launch); the default tiny preset (I = 32) runs gate and up apart.
WIDE = dict(hidden_size=256, intermediate_size=384, moe_intermediate_size=128, q_lora_rank=128, kv_lora_rank=64,
            vocab_size=1024)


@pytest.fixture(scope="module")
def fp8_wide(write_ckpt):
    return write_ckpt("tiny_fp8_wide", seed=3, fp8=True, overrides=WIDE)


def _engine(path, device="cpu", dtype="float32", **kw) -> LLMEngine:
    kw.setdefault("enforce_eager", True)
    return LLMEngine(EngineConfig(model=str(path), device=device, dtype=dtype, num_blocks=256, block_size=4, **kw))


def _tokens(eng: LLMEngine, ps, params=GREEDY) -> list[list[int]]:
    return [o["outputs"][0]["token_ids"] for o in eng.generate(ps, params)]


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- CPU (CI) ------------------------------------------------------------------------------------------------------

def test_fp8_on_cpu_holds_float8_and_equals_dequantised(tiny_ckpt_fp8):
    ref = load_model(tiny_ckpt_fp8, dtype=torch.float32, quantization="none")
    q = load_model(tiny_ckpt_fp8, dtype=torch.float32, quantization="fp8")
    auto = load_model(tiny_ckpt_fp8, dtype=torch.float32, quantization="auto")
    assert not holds_fp8(ref) and not holds_fp8(auto)                  # auto on the CPU: dequantised as before
    # every linear of the blocks but kv_b_proj, and every expert stack, in FP8 with its block scales
    names = fp8_linear_names(ref)
    assert names and not any(n.endswith("kv_b_proj") for n in names) and any(n.startswith("mtp.") for n in names)
    for n in names:
        mod = q.get_submodule(n)
        assert type(mod) is Fp8Linear and mod.weight.dtype == FP8_DTYPE, n
        assert mod.weight_scale_inv.dtype == torch.float32
        assert mod.weight_scale_inv.shape == (-(-mod.out_features // 128), -(-mod.in_features // 128))
    for m in q.moe_layers():
        ex = m.experts
        E, two_i, h = ex.gate_up_proj.shape
        assert ex.fp8 and ex.gate_up_proj.dtype == ex.down_proj.dtype == FP8_DTYPE
        assert ex.gate_up_proj_scale_inv.shape == (E, 2 * -(-two_i // 2 // 128), -(-h // 128))
        assert ex.down_proj_scale_inv.shape == (E, -(-h // 128), -(-two_i // 2 // 128))
    assert q.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float32
    assert q.lm_head.weight.dtype == q.model.embed_tokens.weight.dtype == torch.float32
    assert q.model.layers[1].mlp.gate.weight.dtype == torch.float32
    # bytes: each FP8 element is 1 byte where the fp32 model holds 4, plus 4 bytes per block scale
    n8 = sum(p.numel() for p in q.parameters() if p.dtype == FP8_DTYPE)
    scales = sum(p.numel() for n, p in q.named_parameters() if n.endswith("_scale_inv"))
    assert n8 > 0
    assert _weight_bytes(q) == _weight_bytes(ref) - 3 * n8 + 4 * scales
    # dtype casts leave FP8 weights and scales as they are (model.to / .float), device moves take them along
    q16 = load_model(tiny_ckpt_fp8, dtype=torch.float32, quantization="fp8").to(torch.bfloat16).float().to("cpu")
    assert q16.model.embed_tokens.weight.dtype == torch.float32 and holds_fp8(q16)
    a, b = q16.model.layers[2].mlp.experts, q.model.layers[2].mlp.experts
    assert torch.equal(a.down_proj_scale_inv, b.down_proj_scale_inv) and a.down_proj.dtype == FP8_DTYPE
    # the same numbers: the per-call dequantisation is the load-time one
    ids = torch.tensor(prompts(1, (13, 13)))
    with torch.no_grad():
        assert torch.equal(q(ids), ref(ids))
        h = ref.hidden_states(ids)
        assert torch.equal(q.mtp_logits(h[:, :-1], ids[:, 1:]), ref.mtp_logits(h[:, :-1], ids[:, 1:]))


def test_fp8_engine_greedy_equals_dequantised_with_mtp(tiny_ckpt_fp8):
    ps = prompts(2, (5, 17, 9))
    runs = {}
    for q in ("none", "fp8"):
        eng = _engine(tiny_ckpt_fp8, quantization=q, num_speculative_tokens=1)
        try:
            assert holds_fp8(eng.model) == (q == "fp8")
            runs[q] = _tokens(eng, ps)
        finally:
            eng.close()
    assert runs["fp8"] == runs["none"]
    ref = load_model(tiny_ckpt_fp8, dtype=torch.float32)
    assert runs["fp8"][0] == greedy_reference(ref, ps[0], GREEDY.max_tokens)


def test_fp8_gate_up_apart_and_together_equal_dequantised(tiny_ckpt_fp8, fp8_wide):
    """moe_intermediate_size 32 (gate and up blocks apart) and 128 (one stack), every expert path on the CPU."""
    for path in (tiny_ckpt_fp8, fp8_wide):
        ref = load_model(path, dtype=torch.float32, quantization="none")
        q = load_model(path, dtype=torch.float32, quantization="fp8")
        ex_r, ex_q, gate = ref.model.layers[1].mlp.experts, q.model.layers[1].mlp.experts, ref.model.layers[1].mlp.gate
        assert len(ex_q.fp8_parts("gate_up_proj")) == (1 if ex_q.gate_up_proj.shape[1] // 2 % 128 == 0 else 2)
        x = torch.randn(21, ref.config.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ids, w, _ = gate(x)
            for fn in ("_loop", "_padded", "_dense", "_grouped"):
                assert torch.equal(getattr(ex_q, fn)(x, ids, w), getattr(ex_r, fn)(x, ids, w)), (path.name, fn)
            assert torch.equal(ex_q._gathered(x[:2], ids[:2], w[:2]), ex_r._gathered(x[:2], ids[:2], w[:2]))


def test_expert_shards_of_an_fp8_checkpoint_keep_fp8(tiny_ckpt_fp8):
    ids = {1: [0, 3, 7, 12], 2: [5, 6]}
    dense, keys_d = load_experts(tiny_ckpt_fp8, ids, torch.float32, quantization="none")
    fp8, keys_q = load_experts(tiny_ckpt_fp8, ids, torch.float32, quantization="fp8")
    auto, _ = load_experts(tiny_ckpt_fp8, ids, torch.float32, quantization="auto")
    assert keys_d == keys_q and all(".mlp.experts." in k for k in keys_q)      # still only its own experts' bytes
    full = load_model(tiny_ckpt_fp8, dtype=torch.float32, quantization="fp8")
    for layer, mod in fp8.items():
        assert mod.fp8 and mod.gate_up_proj.dtype == FP8_DTYPE and not auto[layer].fp8
        x = torch.randn(9, full.config.hidden_size, generator=torch.Generator().manual_seed(layer))
        with torch.no_grad():
            topk, w, _ = full.model.layers[layer].mlp.gate(x)
            assert torch.equal(mod(x, topk, w), dense[layer](x, topk, w))
        owner = full.model.layers[layer].mlp.experts
        for local, e in enumerate(mod.expert_ids):                # the very bytes and scales of those experts
            assert torch.equal(mod.gate_up_proj[local].view(torch.uint8), owner.gate_up_proj[e].view(torch.uint8))
            assert torch.equal(mod.down_proj_scale_inv[local], owner.down_proj_scale_inv[e])


def test_fp8_engine_with_expert_shards_equals_dequantised(tiny_ckpt_fp8):
    """The in-process shard set: router and shards under `fp8` give the unsharded dequantised engine's tokens."""
    from raymoe.platform.config import ParallelConfig
    ps = prompts(4, (6, 11))
    base = _engine(tiny_ckpt_fp8, quantization="none")
    sharded = _engine(tiny_ckpt_fp8, quantization="fp8",
                      parallel=ParallelConfig(num_shards=2, transport="local"))
    try:
        assert holds_fp8(sharded.model)
        assert all(m.fp8 for s in sharded.ep.active.shards for m in s.experts.values())
        assert _tokens(sharded, ps) == _tokens(base, ps)
    finally:
        base.close()
        sharded.close()


def test_multi_lora_on_an_fp8_base_equals_dequantised_base(tiny_ckpt_fp8, tmp_path):
    ps = prompts(5, (7, 10))
    ad = make_adapter(tiny_ckpt_fp8, tmp_path / "all4", ("all",), 4, 8.0, seed=1)
    out = {}
    for q in ("none", "fp8"):
        eng = _engine(tiny_ckpt_fp8, quantization=q, max_loras=2)
        try:
            eng.load_adapter("all4", str(ad))
            if q == "fp8":
                assert type(eng.model.model.layers[0].self_attn.q_a_proj) is LoraFp8Linear
            out[q] = _tokens(eng, ps + ps, [GREEDY, GREEDY] + [GREEDY.model_copy(update={"adapter": "all4"})] * 2)
        finally:
            eng.close()
    assert out["fp8"] == out["none"]
    assert out["fp8"][:2] != out["fp8"][2:]                       # the adapter changes the tokens
    from raymoe.platform.checkpoint.adapter import apply_adapter
    with pytest.raises(CheckpointError, match="cannot merge into .* held in FP8"):   # merged: refused, not corrupted
        apply_adapter(load_model(tiny_ckpt_fp8, dtype=torch.float32, quantization="fp8"), ad)


@pytest.mark.slow
def test_fp8_cpu_compile_equals_eager(tiny_ckpt_fp8):
    """torch.compile traces the per-call dequantisation (freezing folds it): the compiled steps give eager's tokens."""
    ps = prompts(6, (5, 9))
    eng = _engine(tiny_ckpt_fp8, quantization="fp8", cpu_compile=True, enforce_eager=False,
                  num_speculative_tokens=1)
    try:
        got = _tokens(eng, ps)
        assert eng.runner.compiled.failed is None and eng.runner.compiled.seen
    finally:
        eng.close()
    ref = _engine(tiny_ckpt_fp8, quantization="none", num_speculative_tokens=1)
    try:
        assert got == _tokens(ref, ps)
    finally:
        ref.close()


def test_dummy_fp8_makes_float8_weights_of_the_real_shapes(tiny_ckpt_fp8, tiny_ckpt, tmp_path):
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(tiny_ckpt / "config.json", folder / "config.json")           # a bf16 config: fp8 asked explicitly
    m = load_model(folder, dtype=torch.float32, load_format="dummy", quantization="fp8", seed=2)
    ref = load_model(tiny_ckpt_fp8, dtype=torch.float32, quantization="fp8")
    got, want = dict(m.named_parameters()), dict(ref.named_parameters())
    assert got.keys() == want.keys()
    for n, p in want.items():
        assert got[n].shape == p.shape and got[n].dtype == p.dtype, n
    w8 = m.model.layers[1].mlp.experts.gate_up_proj
    assert w8.float().std() > 0.5 and torch.isfinite(w8.float()).all()        # N(0, 1) in e4m3, not zeros
    s = m.model.layers[0].self_attn.q_a_proj.weight_scale_inv
    assert torch.allclose(s, torch.full_like(s, m.config.hidden_size ** -0.5))
    # a config declaring FP8: auto keeps it dense on the CPU, fp8 makes FP8; the model runs
    folder8 = tmp_path / "config_only_fp8"
    folder8.mkdir()
    shutil.copy(tiny_ckpt_fp8 / "config.json", folder8 / "config.json")
    assert not holds_fp8(load_model(folder8, dtype=torch.float32, load_format="dummy", quantization="auto"))
    eng = _engine(folder8, load_format="dummy", quantization="fp8", seed=1)
    try:
        assert holds_fp8(eng.model) and len(_tokens(eng, prompts(0, (6,)))[0]) == GREEDY.max_tokens
    finally:
        eng.close()


def test_bad_combinations_fail_clearly(tiny_ckpt, tiny_ckpt_fp8):
    with pytest.raises(CheckpointError, match="quantization 'fp8' .* no FP8 quantization_config"):
        load_model(tiny_ckpt, dtype=torch.float32, quantization="fp8")
    with pytest.raises(CheckpointError, match="quantization 'fp8'"):
        load_experts(tiny_ckpt, {1: [0]}, torch.float32, quantization="fp8")
    with pytest.raises(ValueError, match="quantization must be"):
        load_model(tiny_ckpt_fp8, quantization="int4")
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(model=str(tiny_ckpt_fp8), quantization="int8")
    assert not holds_fp8(load_model(tiny_ckpt, dtype=torch.float32, quantization="auto"))   # bf16 ckpt: nothing
    cfg = ModelConfig.from_pretrained(tiny_ckpt_fp8)
    odd = cfg.model_copy(update={"quantization_config": cfg.quantization_config.model_copy(
        update={"weight_block_size": (64, 64)})})
    with pytest.raises(CheckpointError, match="128x128 blocks only"):
        load_model(tiny_ckpt_fp8, dtype=torch.float32, quantization="fp8", config=odd)


# ---- the Triton path: a GPU, or Triton's interpreter on the CPU ----------------------------------------------------

def _kernel_device():
    if torch.cuda.is_available() and kernels.triton_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" and kernels.triton_available() else None


@pytest.mark.skipif(_kernel_device() is None, reason="needs a CUDA GPU with Triton, or TRITON_INTERPRET=1 for a "
                    "development run of the kernels on the CPU")
@pytest.mark.parametrize("which", ["tiny", "wide"])
def test_fp8_kernel_forward_within_fp8_error_of_dequantised(tiny_ckpt_fp8, fp8_wide, which, monkeypatch):
    dev = _kernel_device()
    if dev == "cpu":                         # the interpreter runs the kernels on CPU tensors
        monkeypatch.setattr(kernels, "enabled", lambda x: kernels._on and kernels.triton_available())
    path = tiny_ckpt_fp8 if which == "tiny" else fp8_wide
    q = load_model(path, dtype=torch.bfloat16, device=dev, quantization="fp8")
    bf16 = load_model(path, dtype=torch.bfloat16, device=dev, quantization="none")
    ref = load_model(path, dtype=torch.float32, device=dev, quantization="none")
    ids = torch.tensor(prompts(3, (11, 11)), device=dev)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()             # noqa: E731
    with torch.no_grad():
        want = ref(ids)
        got = q(ids)
        with kernels.set_enabled(False):
            deq = q(ids)                                         # the same FP8 weights, dequantised per call
        dense = bf16(ids)                                        # dequantised at load, bf16
        x = torch.randn(7, q.config.hidden_size, device=dev).to(torch.bfloat16)
        lin = q.model.layers[1].self_attn.q_a_proj              # one FP8 GEMM alone: within bf16 rounding
        one = rel(lin(x), x.float() @ lin.dense(torch.float32).T)
    print(f"{which}: logits vs fp32 truth: FP8 kernels {rel(got, want):.4f}, FP8 dequantised per call "
          f"{rel(deq, want):.4f}, bf16 dequantised at load {rel(dense, want):.4f}; one q_a_proj GEMM {one:.5f}")
    assert one < 1e-2
    # end to end bf16 rounding compounds (and flips some routing): the kernels stay within bf16's own error
    assert rel(got, want) < 2 * rel(dense, want) + 0.02 and rel(deq, want) < 2 * rel(dense, want) + 0.02
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.7


@pytest.mark.skipif(_kernel_device() != "cpu", reason="a development run of the engine's kernel paths on the CPU: "
                    "TRITON_INTERPRET=1 (on a GPU the tests below cover them)")
def test_fp8_engine_kernel_paths_in_the_interpreter(fp8_wide, monkeypatch):
    """Every kernel of a decode and MTP step (FP8 linears, grouped FP8 experts, paged MLA decode) run by Triton's
    interpreter gives the tokens of the same FP8 weights dequantised per call to bf16, up to bf16 rounding (the
    kernels apply the fp32 block scales to fp32 sums: the two part late, if at all)."""
    monkeypatch.setattr(kernels, "enabled", lambda x: kernels._on and kernels.triton_available())
    ps = prompts(10, (6, 3))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    runs = {}
    for on in (True, False):
        with kernels.set_enabled(on):
            eng = _engine(fp8_wide, dtype="bfloat16", quantization="fp8", num_speculative_tokens=1)
            try:
                runs[on] = _tokens(eng, ps, params)
            finally:
                eng.close()
    assert [r[:3] for r in runs[True]] == [r[:3] for r in runs[False]], runs
    assert _agreement(runs[True], runs[False]) >= 0.75, runs


def _agreement(runs: list[list[int]], truth: list[list[int]]) -> float:
    """Share of the steps before each sequence's first token that differs from the truth's (greedy decode parts
    for good after one different token, so later steps compare nothing)."""
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(runs, truth)]
    return sum(first) / sum(len(x) for x in truth)


MARGIN = 0.1          # fp32 top-1 - top-2 logit margin under which bf16-level rounding may pick either token


def _fp32_margins(path, ps, n: int) -> list[tuple[list[int], list[float]]]:
    """fp32 greedy tokens (no cache) of each prompt and each step's top-1 - top-2 logit margin."""
    model = load_model(path, dtype=torch.float32, device="cuda", quantization="none")
    return [greedy_margins(model, p, n)[:2] for p in ps]


def _early_partings(runs: list[list[int]], ref) -> tuple[int, int]:
    """(sequences that part from the fp32 tokens before their first step of margin < MARGIN, steps compared)."""
    early, compared = 0, 0
    for got, (want, margins) in zip(runs, ref):
        for step, (a, b) in enumerate(zip(got, want)):
            if margins[step] < MARGIN:
                break
            compared += 1
            if a != b:
                early += 1
                break
    return early, compared


@needs_cuda
@pytest.mark.parametrize("which", ["tiny", "wide"])
def test_fp8_greedy_on_cuda_agrees_with_dequantised(tiny_ckpt_fp8, fp8_wide, which):
    """FP8 kept (auto on CUDA, the Triton GEMMs, bf16 activations) against the checkpoint dequantised at load in
    fp32 (the truth), beside bf16 dequantised at load against the same truth. Every FP8 GEMM is closer to the
    truth than a bf16 weight's (test_fp8_kernel_forward_within_fp8_error_of_dequantised), but a random tiny model
    has many near-tied logits and expert scores, so where two bf16-level paths part is chance (measured on an H100:
    wide, FP8 0.16 of the steps before the first difference, bf16 0.47; tiny 0.49 / 0.48). What must hold: both
    follow the fp32 tokens wherever the fp32 margin leaves room (up to each sequence's first step of margin below
    MARGIN), but for a sequence or two that a routing flip parts early; a broken path parts at wide margins in
    most sequences. The agreement is printed."""
    path = tiny_ckpt_fp8 if which == "tiny" else fp8_wide
    ps = prompts(8, (5, 19, 33, 8, 12, 7, 21, 9, 14, 26, 6, 17))
    n = 16
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    ref = _fp32_margins(path, ps, n)
    runs = {}
    for name, q, dtype in (("fp8", "auto", "bfloat16"), ("bf16", "none", "bfloat16"), ("fp32", "none", "float32")):
        eng = _engine(path, device="cuda", dtype=dtype, quantization=q)
        try:
            assert holds_fp8(eng.model) == (name == "fp8")             # auto on CUDA: FP8 kept
            runs[name] = _tokens(eng, ps, params)
        finally:
            eng.close()
    fp8, bf16 = _agreement(runs["fp8"], runs["fp32"]), _agreement(runs["bf16"], runs["fp32"])
    (e8, c8), (e16, c16) = _early_partings(runs["fp8"], ref), _early_partings(runs["bf16"], ref)
    print(f"{which}: greedy agreement with fp32 dequantised: FP8 (Triton) {fp8:.3f}, bf16 dequantised {bf16:.3f}; "
          f"sequences parting before a margin < {MARGIN}: FP8 {e8}, bf16 {e16} of {len(ps)} "
          f"({c8} / {c16} steps compared)")
    assert e8 <= 2 and e16 <= 2, (e8, e16)
    assert c8 >= len(ps), c8                      # the margins leave some steps to compare (wide: 18 of 192)


@needs_cuda
@pytest.mark.parametrize("k", [0, 1])
def test_fp8_cuda_graphs_equal_eager(fp8_wide, k):
    ps = prompts(12, (5, 19, 33, 8, 12))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    runs = {}
    for eager in (True, False):
        eng = _engine(fp8_wide, device="cuda", dtype="bfloat16", quantization="fp8", enforce_eager=eager,
                      cuda_graph_sizes=[1, 2, 4, 8], num_speculative_tokens=k)
        try:
            runs[eager] = _tokens(eng, ps, params)
            if not eager:
                assert eng.runner.graphs.graphs                         # captured and replayed
        finally:
            eng.close()
    assert runs[True] == runs[False]


@needs_cuda
def test_fp8_multi_lora_cuda_graphs_equal_eager(fp8_wide, tmp_path):
    ps = prompts(9, (5, 8, 6, 9))
    ad = make_adapter(fp8_wide, tmp_path / "all4", ("all",), 4, 8.0, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, adapter=a) for a in
              ("all4", None, "all4", None)]
    runs = {}
    for eager in (True, False):
        eng = _engine(fp8_wide, device="cuda", dtype="bfloat16", quantization="fp8", enforce_eager=eager,
                      cuda_graph_sizes=[1, 2, 4, 8], max_loras=2)
        try:
            eng.load_adapter("all4", str(ad))
            runs[eager] = _tokens(eng, ps, params)
            if not eager:
                assert any(key[-1] for key in eng.runner.graphs.graphs)   # a LoRA graph captured and replayed
        finally:
            eng.close()
    assert runs[True] == runs[False]
    assert runs[True][0] != _tokens_base(fp8_wide, ps[:1])[0]              # the adapter changes the tokens


def _tokens_base(path, ps):
    eng = _engine(path, device="cuda", dtype="bfloat16", quantization="fp8")
    try:
        return _tokens(eng, ps, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    finally:
        eng.close()
