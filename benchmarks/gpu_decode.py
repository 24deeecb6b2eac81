"""GPU decode benchmark: a full-width DeepSeek-V3 stack of a few layers (hidden 7168, 256 experts, MLA dims,
random bf16 weights) decoding through raymoe's engine, against the memory-bandwidth floor and against transformers'
DeepseekV3ForCausalLM holding the very same weight tensors (through its own `generate`, static compiled cache and
dynamic cache), in the same run. Sections (--sections, comma list):
  kernel    the paged MLA decode kernel alone vs the einsum path vs the bandwidth and compute floors (no model)
  fp8       weight-only FP8 GEMMs vs bf16 at decode shapes (no model)
  steps     engine steps before (PyTorch attention) / after (kernel), and the transformers peer
  long      8K-128K decode steps before/after through the model runner (random latents in the cache)
  fidelity  raymoe bf16 vs fp32 truth, transformers bf16 vs fp32 truth (fp32 copy of the weights)
  profile   where a graphed decode step's time goes: the profiler's CUDA kernel table at --profile-batches
  fp8tune   tile sweep of the FP8 GEMMs at DeepSeek-V3's decode shapes; writes the fastest tiles for this GPU to
            platform/kernels/fp8_tiles.json (--no-write: print only), which later sections and the engine use
  fp8steps  engine steps of the same model with its block weights and routed experts in FP8 (the bf16 weights
            block-quantised as the release is) against the bf16 model, each against its own floor (FP8 weights
            1 byte + block scales); FP8 / bf16 step time at --fp8-batches (target <= 0.6); FP8 logits vs bf16

    PYTHONPATH=src python benchmarks/gpu_decode.py --sections kernel,fp8
    PYTHONPATH=src python benchmarks/gpu_decode.py --sections steps [--layers 4] [--prompt 512] [--out DIR]
    PYTHONPATH=src python benchmarks/gpu_decode.py --sections fidelity,long --layers 2
    PYTHONPATH=src python benchmarks/gpu_decode.py --sections fp8steps --layers 2 [--fp8-batches 1,32]
    PYTHONPATH=src python benchmarks/gpu_decode.py --sections fp8tune,fp8steps --layers 2

The floor of a decode step = bytes it must read (every attention/dense/shared weight, the routed experts the batch
actually selects, the gates, the LM head, the embedding rows, the latent cache) / measured device copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import V3_DIMS, YARN, elapsed, matmul_tflops  # noqa: E402


def copy_bandwidth(gb: float = 4.0) -> float:
    n = int(gb * 2 ** 30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * n * 2 / statistics.median(ts)      # bytes read + written per second


DEV = "cuda"
SMOKE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
             num_attention_heads=4, num_key_value_heads=4, n_routed_experts=32, kv_lora_rank=64, q_lora_rank=64,
             qk_rope_head_dim=32, v_head_dim=32, qk_nope_head_dim=32)


def build(layers: int, smoke: bool = False):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM as HF

    from raymoe.platform.config import ModelConfig
    from raymoe.platform.model import DeepseekV3ForCausalLM
    dims = {**V3_DIMS, "num_hidden_layers": layers, "first_k_dense_replace": 1, "num_key_value_heads": 128,
            "norm_topk_prob": True, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    if smoke:
        dims.update(SMOKE)
    rope = dict(YARN)
    hf_cfg = DeepseekV3Config(**dims, rope_scaling=dict(rope, rope_type="yarn"), rope_theta=10000.0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEV):
        hf = HF(hf_cfg).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():   # healthier random weights than init 0.02 for routing variety; norms at 1
        for name, p in hf.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, p.shape[-1] ** -0.5)
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    cfg = ModelConfig.from_dict({**dims, "rope_scaling": rope, "num_nextn_predict_layers": 0})
    with torch.device("meta"):
        ours = DeepseekV3ForCausalLM(cfg)
    hf_params = dict(hf.named_parameters())
    hf_params.update(hf.named_buffers())
    for name, _ in list(ours.named_parameters()) + list(ours.named_buffers()):
        mod_name, _, attr = name.rpartition(".")
        mod = ours.get_submodule(mod_name)
        src = hf_params[name]                      # same names as HF: the weights are shared, not copied
        if attr in mod._parameters:
            mod._parameters[attr] = torch.nn.Parameter(src, requires_grad=False)
        else:
            mod._buffers[attr] = src
    ours.eval()
    return hf, ours, cfg


def fp8_twin(ours, cfg):
    """The same model with what the release stores in FP8 held in FP8 (model/fp8.py: the block linears but kv_b_proj,
    and the routed experts), block-quantised on the GPU from `ours`' bf16 weights (gate and up apart, as the
    checkpoint stores them); every other tensor is `ours`' own (shared, not copied)."""
    from raymoe.platform.checkpoint.fp8 import quantize_blockwise
    from raymoe.platform.model import DeepseekV3ForCausalLM
    from raymoe.platform.model.fp8 import fp8_linear_names, use_fp8
    with torch.device("meta"):
        twin = DeepseekV3ForCausalLM(cfg)
    use_fp8(twin, fp8_linear_names(twin), experts=True)
    src = dict(ours.named_parameters())
    src.update(ours.named_buffers())
    for name, p in list(twin.named_parameters()) + list(twin.named_buffers()):
        mod_name, _, attr = name.rpartition(".")
        mod = twin.get_submodule(mod_name)
        if p.dtype != torch.float8_e4m3fn and not name.endswith("_scale_inv"):
            if attr in mod._parameters:
                mod._parameters[attr] = torch.nn.Parameter(src[name], requires_grad=False)
            else:
                mod._buffers[attr] = src[name]
            continue
        if name.endswith("_scale_inv"):
            continue                                    # made with its weight
        w = src[name]
        stack = w if w.dim() == 3 else w[None]
        w8 = torch.empty(stack.shape, dtype=torch.float8_e4m3fn, device=w.device)
        halves = 2 if attr == "gate_up_proj" else 1
        parts8, parts_s = [], []
        for e in range(stack.shape[0]):
            qs = [quantize_blockwise(h) for h in stack[e].chunk(halves, dim=0)]
            w8[e] = torch.cat([q for q, _ in qs])
            parts_s.append(torch.cat([s for _, s in qs]))
        scales = torch.stack(parts_s)
        if w.dim() == 2:
            w8, scales = w8[0], scales[0]
        mod._parameters[attr] = torch.nn.Parameter(w8, requires_grad=False)
        mod._parameters[f"{attr}_scale_inv"] = torch.nn.Parameter(scales, requires_grad=False)
    twin.eval()
    return twin


def weight_bytes(ours, cfg, unique_experts: float, batch: int, ctx: int) -> float:
    """Bytes a decode step must read; FP8 weights count 1 byte per value plus their fp32 block scales."""
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    fp8 = bool(ours.moe_layers()) and ours.moe_layers()[0].experts.fp8
    blocks = 2 * -(-I // 128) * -(-H // 128) + -(-H // 128) * -(-I // 128)
    per_expert = 3 * H * I + 4 * blocks if fp8 else 3 * H * I * 2
    total = 0
    for name, p in ours.named_parameters():
        if ".experts." in name:
            continue
        if name == "model.embed_tokens.weight":
            total += batch * cfg.hidden_size * 2
            continue
        total += p.numel() * p.element_size()
    total += unique_experts * per_expert * len(cfg.moe_layers)
    total += batch * ctx * cfg.latent_dim * 2 * cfg.num_hidden_layers
    return total


def bench_ours(ours, cfg, batch: int, prompt: int, steps: int) -> tuple[float, float]:
    from raymoe.platform.config import EngineConfig, SamplingParams
    from raymoe.platform.engine import LLMEngine
    bs = 64
    need = batch * (-(-(prompt + steps + 16) // bs))
    eng = LLMEngine(EngineConfig(model="bench", device=DEV, dtype="bfloat16", block_size=bs, num_blocks=need + 4,
                                 max_model_len=prompt + steps + 64, max_num_batched_tokens=16384,
                                 enable_prefix_caching=False, cuda_graph_sizes=[1, 8, 32]), model=ours)
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=steps + 12, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"b{i}", torch.randint(0, cfg.vocab_size, (prompt,), generator=g).tolist(), params)
    while any(s.num_uncomputed > 1 for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    for _ in range(5):                         # graph capture + warm-up
        eng.step()
    times = [elapsed(eng.step, DEV) for _ in range(steps)]
    moes = ours.moe_layers()
    uniq = []
    for _ in range(3):
        eng.runner.graphs = eng.runner.uniform = None   # eager for the routing record (graphs keep stale references)
        for m in moes:
            m.count_load()
        eng.step()
        uniq += [int((m.expert_load > 0).sum()) for m in moes]
    for m in moes:
        m.count_load(False)
    for rid in list(eng.requests):
        eng.abort(rid)
    del eng
    torch.cuda.empty_cache()
    return statistics.median(times), sum(uniq) / len(uniq)


def profile_step(ours, cfg, batch: int, prompt: int, steps: int = 10, top: int = 30) -> list[dict]:
    """The CUDA kernels of `steps` graphed decode steps at `batch` (torch.profiler; kernels inside CUDA graphs are
    traced), grouped by name: time per step, calls per step, share of the step."""
    from torch.profiler import ProfilerActivity, profile

    from raymoe.platform.config import EngineConfig, SamplingParams
    from raymoe.platform.engine import LLMEngine
    bs = 64
    need = batch * (-(-(prompt + 3 * steps + 32) // bs))
    eng = LLMEngine(EngineConfig(model="bench", device=DEV, dtype="bfloat16", block_size=bs, num_blocks=need + 4,
                                 max_model_len=prompt + 3 * steps + 64, max_num_batched_tokens=16384,
                                 enable_prefix_caching=False, cuda_graph_sizes=[1, 8, 32]), model=ours)
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=3 * steps + 24, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"p{i}", torch.randint(0, cfg.vocab_size, (prompt,), generator=g).tolist(), params)
    while any(s.num_uncomputed > 1 for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    for _ in range(5):
        eng.step()

    def run() -> None:
        for _ in range(steps):
            eng.step()
    wall = elapsed(run, DEV) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    for rid in list(eng.requests):
        eng.abort(rid)
    del eng
    torch.cuda.empty_cache()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0.0, 0])
            k[0] += e.time_range.elapsed_us()
            k[1] += 1
    total = sum(v[0] for v in kernels.values()) / steps
    rows = sorted(({"kernel": n[:90], "us_per_step": v[0] / steps, "calls_per_step": v[1] / steps}
                   for n, v in kernels.items()), key=lambda r: -r["us_per_step"])
    print(f"\n### profile, batch {batch}: wall {wall * 1e3:.2f} ms/step, GPU kernels {total / 1e3:.2f} ms/step "
          f"({len(kernels)} distinct kernels, {sum(v[1] for v in kernels.values()) / steps:.0f} launches/step)")
    print("| kernel | us/step | calls/step | share |")
    print("| --- | --- | --- | --- |")
    for r in rows[:top]:
        print(f"| {r['kernel']} | {r['us_per_step']:.1f} | {r['calls_per_step']:.1f} | "
              f"{100 * r['us_per_step'] / max(total, 1e-9):.1f}% |")
    return [dict(batch=batch, wall_ms=wall * 1e3, kernel_ms=total / 1e3)] + rows[:top]


def bench_hf_generate(hf, cfg, batch: int, prompt: int, steps: int, static: bool) -> float:
    """transformers' own fast path: `generate` (greedy, exactly N new tokens) with a static cache, which transformers
    compiles by itself on CUDA, or with the default dynamic cache. Per-token time = (t(4 + steps) - t(4)) / steps,
    so the prefill and the first tokens drop out; the first call (compilation) is untimed."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=g).to(DEV)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"

    def run(n: int) -> float:
        def call() -> None:
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
        return elapsed(call, DEV)

    run(4 + steps)                                      # compilation (static) and warm-up
    short = statistics.median(run(4) for _ in range(2))
    long = statistics.median(run(4 + steps) for _ in range(2))
    torch.cuda.empty_cache()
    return (long - short) / steps


def bench_kernel(bw: float, tf: float, contexts: list[int], batches: list[int], heads: int = 128,
                 sweep: bool = True) -> list[dict]:
    """The paged MLA decode kernel alone against the PyTorch (gather + einsum) path it replaces and against the
    bandwidth floor (each cached latent read once) and the compute floor (QK over 576 + PV over 512 per head)."""
    import triton.testing

    from raymoe.platform import kernels
    from raymoe.platform.kernels.mla_decode import default_config, flops_and_bytes, paged_mla_decode
    from raymoe.platform.model.attention import PagedAttention, paged_latent_attention
    R, P, bs = 512, 64, 64
    scale = (128 + 64) ** -0.5
    rows = []

    def setup(B: int, L: int):
        nblk = L // bs
        copies = max(1, -(-256 * 2 ** 20 // (B * L * (R + P) * 2)))      # rotate past the 60 MB L2
        sets = []
        for _ in range(copies):
            cache = torch.randn(B * nblk, bs, R + P, device=DEV, dtype=torch.bfloat16)
            tables = torch.randperm(B * nblk, device=DEV).view(B, nblk)
            sets.append((cache, tables))
        q = torch.randn(B, heads, R + P, device=DEV, dtype=torch.bfloat16)
        lens = torch.full((B,), L, device=DEV, dtype=torch.long)
        return sets, q, lens

    def time_kernel(sets, q, lens, config=None) -> float:
        it = iter(range(1 << 30))

        def call():
            cache, tables = sets[next(it) % len(sets)]
            return paged_mla_decode(q, cache, tables, lens, 1, scale, R, config=config)
        return triton.testing.do_bench(call, warmup=10, rep=60, return_mode="median") / 1e3

    if sweep:
        # 16 warps and a query re-read per tile were tried on 2026-12-06 and lost (BENCHMARKS.md)
        configs = [dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
                   dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
                   dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=1),
                   dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=4),
                   dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)]
        print("kernel tile sweep (context 32768):", flush=True)
        totals = {i: 0.0 for i in range(len(configs))}                  # summed over the batches; a failure drops out
        for B in (1, 32):
            sets, q, lens = setup(B, 32768)
            fl, by = flops_and_bytes(B, 32768, heads, 1, R, P)
            for i, c in enumerate(configs):
                try:
                    t = time_kernel(sets, q, lens, c)
                    if i in totals:
                        totals[i] += t
                    print(f"  batch {B} {c}: {t * 1e6:.0f} us, {by / t / 1e12:.2f} TB/s, {fl / t / 1e12:.0f} TFLOP/s",
                          flush=True)
                except Exception as e:                              # noqa: BLE001 - a shape that does not compile
                    totals.pop(i, None)
                    print(f"  batch {B} {c}: failed {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            del sets, q, lens
            torch.cuda.empty_cache()
        best = configs[min(totals, key=totals.get)] if totals else None
        print(f"fastest in the sweep (batch 1 + 32): {best}", flush=True)
    else:
        best = None
    if best is not None and {**default_config(heads, R), **best} == default_config(heads, R):
        best = None
    print(f"default tiles for {heads} heads: {default_config(heads, R)}", flush=True)
    for L in contexts:
        for B in batches:
            sets, q, lens = setup(B, L)
            fl, by = flops_and_bytes(B, L, heads, 1, R, P)
            t_k = time_kernel(sets, q, lens)
            t_b = time_kernel(sets, q, lens, best) if best is not None else t_k
            cache, tables = sets[0]
            meta = PagedAttention.uniform(torch.zeros(B, dtype=torch.long, device=DEV), tables, lens, 1, bs)
            with kernels.set_enabled(False):
                t_ref = triton.testing.do_bench(lambda: paged_latent_attention(q, cache, meta, scale, R), warmup=10,
                                                rep=60, return_mode="median") / 1e3
            row = dict(context=L, batch=B, kernel_us=t_k * 1e6, einsum_us=t_ref * 1e6, bw_floor_us=by / bw * 1e6,
                       compute_floor_us=fl / (tf * 1e12) * 1e6, kernel_TBps=by / t_k / 1e12,
                       kernel_TFLOPs=fl / t_k / 1e12, speedup=t_ref / t_k, sweep_best_us=t_b * 1e6)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del sets, q, lens, cache, tables, meta
            torch.cuda.empty_cache()
    print("\n| context | batch | kernel us | einsum us | speedup | bandwidth floor us | kernel % of copy bw "
          "| compute floor us | kernel TFLOP/s | sweep's fastest us | its % of copy bw |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['context']} | {r['batch']} | {r['kernel_us']:.0f} | {r['einsum_us']:.0f} | {r['speedup']:.1f}x "
              f"| {r['bw_floor_us']:.0f} | {100 * r['bw_floor_us'] / r['kernel_us']:.0f}% | "
              f"{r['compute_floor_us']:.0f} | {r['kernel_TFLOPs']:.0f} | {r['sweep_best_us']:.0f} | "
              f"{100 * r['bw_floor_us'] / r['sweep_best_us']:.0f}% |")
    return rows


def bench_long(ours, cfg, bw: float, contexts: list[int], batches: list[int], steps: int) -> list[dict]:
    """Decode steps at long contexts, PyTorch attention (before) and the kernel (after), through the model runner
    with CUDA graphs: the caches hold random latents in place of a prefill (the step's cost does not depend on
    their values), one token per sequence, the logits and their argmax included."""
    from raymoe.platform import kernels
    from raymoe.platform.engine.model_runner import ModelRunner
    bs = 64
    rows = []
    for L in contexts:
        for B in batches:
            nblk = -(-(L + 1) // bs)
            res = {}
            for mode in ("before", "after"):
                with kernels.set_enabled(mode == "after"):
                    runner = ModelRunner(ours, num_blocks=B * nblk, block_size=bs, use_mtp=False, graph_sizes=[B],
                                         max_model_len=nblk * bs)
                    for c in runner.caches:
                        c.normal_()
                    perm = torch.randperm(B * nblk).view(B, nblk).tolist()
                    toks = [[int(t)] for t in torch.randint(0, cfg.vocab_size, (B,))]
                    starts = [L - 1] * B

                    def step():
                        h = runner.forward(toks, perm, starts)
                        return runner.logits(h).argmax(-1)
                    for _ in range(3):
                        step()
                    times = [elapsed(step, DEV) for _ in range(steps)]
                    res[mode] = statistics.median(times)
                    if mode == "after":                 # routing record, eager, for the floor's expert count
                        runner.uniform = None
                        for m in ours.moe_layers():
                            m.count_load()
                        step()
                        uniq = sum(int((m.expert_load > 0).sum()) for m in ours.moe_layers()) / len(ours.moe_layers())
                        for m in ours.moe_layers():
                            m.count_load(False)
                    del runner
                    torch.cuda.empty_cache()
            floor = weight_bytes(ours, cfg, uniq, B, L) / bw
            rows.append(dict(context=L, batch=B, before_ms=res["before"] * 1e3, after_ms=res["after"] * 1e3,
                             floor_ms=floor * 1e3, pct_before=100 * floor / res["before"],
                             pct_after=100 * floor / res["after"]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| context | batch | before ms/step | after ms/step | floor ms | % of floor before | % of floor after |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['context']} | {r['batch']} | {r['before_ms']:.2f} | {r['after_ms']:.2f} | {r['floor_ms']:.2f} "
              f"| {r['pct_before']:.0f}% | {r['pct_after']:.0f}% |")
    return rows


def _path_of(root: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is module)


def fidelity(hf, ours, cfg) -> dict:
    """bf16 error of each implementation against the same weights run in fp32 by transformers (the truth), the fp32
    copy on the host (beside the bf16 model it would not fit an 80 GB card at 2 full-width layers)."""
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)).to(DEV)
    with torch.no_grad():
        lo, lh = ours(ids).float(), hf(ids).logits.float()
        with torch.device("meta"):
            truth_model = type(hf)(hf.config)
        for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
            mod_name, _, attr = name.rpartition(".")
            mod = truth_model.get_submodule(mod_name)
            v = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype)
            if attr in mod._parameters:
                mod._parameters[attr] = torch.nn.Parameter(v, requires_grad=False)
            else:
                mod._buffers[attr] = v
        for m in truth_model.modules():             # plain tensor attributes made on meta (rotary copies)
            for k, v in list(vars(m).items()):
                if isinstance(v, torch.Tensor) and v.is_meta and k not in m._parameters and k not in m._buffers:
                    setattr(m, k, getattr(hf.get_submodule(_path_of(truth_model, m)), k).detach().cpu().float())
        truth = truth_model.eval()(ids.cpu()).logits.float().to(DEV)
        del truth_model
    rel = lambda a: ((a - truth).norm() / truth.norm()).item()          # noqa: E731
    agree = lambda a: (a.argmax(-1) == truth.argmax(-1)).float().mean().item()   # noqa: E731
    out = dict(raymoe_bf16_vs_fp32=rel(lo), transformers_bf16_vs_fp32=rel(lh), raymoe_argmax=agree(lo),
               transformers_argmax=agree(lh))
    print(f"fidelity ({cfg.num_hidden_layers} layers, 64 tokens): raymoe bf16 vs fp32 truth "
          f"{out['raymoe_bf16_vs_fp32']:.3f} rel err (argmax {out['raymoe_argmax']:.2f}), "
          f"transformers bf16 vs fp32 truth "
          f"{out['transformers_bf16_vs_fp32']:.3f} (argmax {out['transformers_argmax']:.2f})", flush=True)
    return out


def random_fp8(shape: tuple[int, ...], copies: int = 1) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`copies` random (e4m3 weight, block scales, the bf16 dequantised weight) of `shape` ([N, K] or [E, N, K]) on
    DEV, made one matrix at a time (an expert stack's fp32 dequantisation would not fit beside it)."""
    from raymoe.platform.checkpoint.fp8 import FP8_MAX, dequantize_blockwise
    out = []
    for _ in range(copies):
        w8 = torch.empty(*shape, device=DEV, dtype=torch.float8_e4m3fn)
        s = torch.rand(*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128), device=DEV) * 1e-2 / FP8_MAX
        s += 1e-4
        dense = torch.empty(*shape, device=DEV, dtype=torch.bfloat16)
        for e in range(w8.shape[0] if w8.dim() == 3 else 1):
            w8e, se, de = (w8[e], s[e], dense[e]) if w8.dim() == 3 else (w8, s, dense)
            w8e.copy_((torch.randn(shape[-2:], device=DEV) * 16).clamp(-FP8_MAX, FP8_MAX).to(w8.dtype))
            de.copy_(dequantize_blockwise(w8e, se, torch.bfloat16))
        out.append((w8, s, dense))
    return out


def bench_fp8(bw: float, batches: list[int]) -> list[dict]:
    """Weight-only FP8 GEMMs (Triton) against bf16 (cuBLAS, torch._grouped_mm) at DeepSeek-V3's decode shapes: the
    dense/shared projections one at a time, and one layer's routed experts (256 x [4096, 7168] gate_up, top-8) in
    one grouped launch. Weights rotate past the L2 where they are small."""
    import triton.testing

    from raymoe.platform.kernels.fp8_gemm import fp8_grouped, fp8_linear
    rows = []
    shapes = {name: (N, K) for name, N, K in FP8_LINEARS + FP8_EXPERTS}
    shapes["shared gate_up"] = shapes["experts gate_up"]       # the one shared expert's gate and up, fused

    bench = lambda f: triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median") / 1e3   # noqa: E731
    for name in ("q_b_proj", "o_proj", "shared gate_up", "dense down"):
        N, K = shapes[name]
        w8, s, w = random_fp8((N, K))[0]
        for M in batches:
            x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
            t8, t16 = bench(lambda: fp8_linear(x, w8, s)), bench(lambda: x @ w.T)
            rows.append(dict(gemm=name, M=M, fp8_us=t8 * 1e6, bf16_us=t16 * 1e6, ratio=t8 / t16,
                             fp8_TBps=N * K / t8 / 1e12, bf16_TBps=2 * N * K / t16 / 1e12))
            print(json.dumps(rows[-1]), flush=True)
        del w8, s, w
    E, (N, K), top = V3_DIMS["n_routed_experts"], shapes["experts gate_up"], V3_DIMS["num_experts_per_tok"]
    w8, s, w = random_fp8((E, N, K))[0]
    for M in batches:
        ids = torch.stack([torch.randperm(E, device=DEV)[:top] for _ in range(M)]).view(-1)
        counts = torch.bincount(ids, minlength=E)
        offs = counts.cumsum(0).to(torch.int32)
        x = torch.randn(M * top, K, device=DEV, dtype=torch.bfloat16)
        used = int((counts > 0).sum())
        t8 = bench(lambda: fp8_grouped(x, w8, s, offs))
        t16 = bench(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs))
        rows.append(dict(gemm=f"experts gate_up x{used}", M=M, fp8_us=t8 * 1e6, bf16_us=t16 * 1e6, ratio=t8 / t16,
                         fp8_TBps=used * N * K / t8 / 1e12, bf16_TBps=2 * used * N * K / t16 / 1e12))
        print(json.dumps(rows[-1]), flush=True)
    del w8, s, w
    print("\n| GEMM | rows | FP8 us | bf16 us | FP8 / bf16 | FP8 weight TB/s | bf16 weight TB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['gemm']} | {r['M']} | {r['fp8_us']:.1f} | {r['bf16_us']:.1f} | {r['ratio']:.2f} | "
              f"{r['fp8_TBps']:.2f} | {r['bf16_TBps']:.2f} |")
    return rows


def _fp8_shapes(d: dict) -> tuple[tuple[tuple[str, int, int], ...], tuple[tuple[str, int, int], ...]]:
    H, I, moe = d["hidden_size"], d["intermediate_size"], d["moe_intermediate_size"]
    heads, q, kv, rope = d["num_attention_heads"], d["q_lora_rank"], d["kv_lora_rank"], d["qk_rope_head_dim"]
    linears = (("q_a_proj", q, H), ("q_b_proj", heads * (d["qk_nope_head_dim"] + rope), q),
               ("kv_a_proj_with_mqa", kv + rope, H), ("o_proj", H, heads * d["v_head_dim"]), ("dense gate/up", I, H),
               ("dense down", H, I), ("shared gate/up", moe * d["n_shared_experts"], H),
               ("shared down", H, moe * d["n_shared_experts"]))
    return linears, (("experts gate_up", 2 * moe, H), ("experts down", H, moe))


# DeepSeek-V3's linears the release stores in FP8 (name, N = out, K = in) and one layer's routed experts (name, N, K)
FP8_LINEARS, FP8_EXPERTS = _fp8_shapes(V3_DIMS)


def tiles_json(data: dict) -> str:
    """fp8_tiles.json's text: one line per tuned shape."""
    lines = ["{"]
    for i, (device, kinds) in enumerate(sorted(data.items())):
        lines.append(f" {json.dumps(device)}: {{")
        for j, (kind, table) in enumerate(sorted(kinds.items())):
            lines.append(f"  {json.dumps(kind)}: {{")
            items = sorted(table.items(), key=lambda kv: [int(v) for v in kv[0].split(",")])
            lines += [f"   {json.dumps(k)}: {json.dumps(list(v))}" + ("," if n < len(items) - 1 else "")
                      for n, (k, v) in enumerate(items)]
            lines.append("  }" + ("," if j < len(kinds) - 1 else ""))
        lines.append(" }" + ("," if i < len(data) - 1 else ""))
    return "\n".join(lines + ["}"]) + "\n"

def bench_fp8_tune(rows_m: list[int], batches: list[int], write: bool = True) -> dict:
    """Tile sweep of the FP8 GEMMs at DeepSeek-V3's decode shapes: every candidate `Tiles` (columns per program,
    K splits, warps, stages) timed against the rule-of-thumb tiles and cuBLAS bf16, weights rotated past the L2;
    candidates whose result is off the bf16 product are dropped. The fastest per shape go to fp8_tiles.json under
    this GPU's name (`write`), which the kernels read from then on."""
    import itertools

    import triton.testing

    from raymoe.platform.kernels import fp8_gemm as g

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bench = lambda f: triton.testing.do_bench(f, warmup=5, rep=15, return_mode="median") * 1e3   # noqa: E731 (us)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()                # noqa: E731

    def rotating(fn, sets):
        it = itertools.cycle(sets)
        return lambda: fn(*next(it))

    def sweep(call, ref, candidates):
        best, timings = None, []
        for t in candidates:
            try:
                if rel(call(t, check=True), ref) > 2e-2:
                    print(f"  tiles {tuple(t)}: wrong result, dropped", flush=True)
                    continue
                us = bench(lambda: call(t))
            except Exception as e:                      # noqa: BLE001 - a tile the compiler refuses: skip it
                print(f"  tiles {tuple(t)}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                continue
            timings.append((us, t))
            if best is None or us < best[0]:
                best = (us, t)
        return best, timings

    table = {"linear": {}, "grouped": {}}
    rows = []
    os.environ["RAYMOE_FP8_TILES"] = "off"                   # the rule of thumb as the baseline
    g.tuned_tiles.cache_clear()
    for name, N, K in FP8_LINEARS:
        copies = max(1, -(-3 * l2 // (N * K)))
        sets = random_fp8((N, K), copies)
        for M in rows_m:
            x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
            ref = x @ sets[0][2].T
            it = itertools.cycle(sets)

            def call(t, check=False):
                w8, s, _ = sets[0] if check else next(it)
                return g.fp8_linear(x, w8, s, t)
            bf16 = bench(rotating(lambda w8, s, w: x @ w.T, sets))
            default = g.linear_tiles(M, N, K, sms)
            cands = {default}
            for bn, waves, warps, stages in itertools.product((32, 64, 128), (1, 2, 4, 8), (4, 8), (3, 4, 6)):
                programs = -(-N // bn) * -(-M // g._block_m(M))
                cands.add(g.Tiles(bn, g._split_for(programs, -(-K // 128), sms, waves), warps, stages))
            for _ in range(3):
                call(default)                               # compiled, and the allocator holds the partial sums
            t_default = bench(lambda: call(default))
            best, _ = sweep(call, ref, sorted(cands))
            best = best or (t_default, default)
            table["linear"][f"{g._block_m(M)},{N},{K}"] = list(best[1])
            rows.append(dict(gemm=name, rows=M, bf16_us=bf16, default_us=t_default, best_us=best[0],
                             best=list(best[1]), best_vs_bf16=best[0] / bf16, fp8_TBps=N * K / best[0] / 1e6))
            print(json.dumps(rows[-1]), flush=True)
        del sets
    E, top = V3_DIMS["n_routed_experts"], V3_DIMS["num_experts_per_tok"]
    for name, N, K in FP8_EXPERTS:
        sets = random_fp8((E, N, K))
        w8, s, w = sets[0]
        for B in batches:
            ids = torch.stack([torch.randperm(E, device=DEV)[:top] for _ in range(B)]).view(-1)
            counts = torch.bincount(ids, minlength=E)
            offs = counts.cumsum(0).to(torch.int32)
            T, busy = B * top, int((counts > 0).sum())
            x = torch.randn(T, K, device=DEV, dtype=torch.bfloat16)
            ref = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
            call = lambda t, check=False: g.fp8_grouped(x, w8, s, offs, t)          # noqa: E731
            bf16 = bench(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs))
            default = g.grouped_tiles(T, E, N, K, sms)
            cands = {default}
            for bn, waves, warps, stages in itertools.product((32, 64, 128), (1, 2, 4, 8), (4, 8), (3, 4)):
                cands.add(g.Tiles(bn, g._split_for(-(-N // bn) * min(T, E), -(-K // 128), sms, waves), warps,
                                  stages))
            for _ in range(3):
                call(default)
            t_default = bench(lambda: call(default))
            best, _ = sweep(call, ref, sorted(cands))
            best = best or (t_default, default)
            table["grouped"][f"{g.busy_bucket(min(T, E))},{N},{K}"] = list(best[1])
            rows.append(dict(gemm=f"{name} x{busy} used", rows=T, bf16_us=bf16, default_us=t_default,
                             best_us=best[0], best=list(best[1]), best_vs_bf16=best[0] / bf16,
                             fp8_TBps=busy * N * K / best[0] / 1e6))
            print(json.dumps(rows[-1]), flush=True)
        del sets, w8, s, w
    del os.environ["RAYMOE_FP8_TILES"]
    torch.cuda.empty_cache()
    print("\n| GEMM | rows | bf16 us | FP8 rule-of-thumb tiles us | FP8 tuned us | tuned tiles (block_n, split_k, "
          "warps, stages) | tuned / bf16 | FP8 weight TB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['gemm']} | {r['rows']} | {r['bf16_us']:.1f} | {r['default_us']:.1f} | {r['best_us']:.1f} | "
              f"{tuple(r['best'])} | {r['best_vs_bf16']:.2f} | {r['fp8_TBps']:.2f} |")
    device = torch.cuda.get_device_name(0)
    if write:
        data = json.loads(g.TILES_FILE.read_text()) if g.TILES_FILE.exists() else {}
        data[device] = table
        g.TILES_FILE.write_text(tiles_json(data))
        g.tuned_tiles.cache_clear()
        print(f"wrote the tuned tiles for {device} to {g.TILES_FILE}", flush=True)
    return dict(device=device, rows=rows, table=table)


def bench_steps(hf, ours, cfg, bw: float, batches: list[int], prompt: int, steps: int, peer_batches: list[int],
                hf_steps: int) -> list[dict]:
    """Engine steps (prompt `prompt`, then decode) with PyTorch attention (before) and the kernel (after), and the
    transformers peer through `generate` with a static compiled cache and with the dynamic cache."""
    from raymoe.platform import kernels
    rows = []
    for B in batches:
        with kernels.set_enabled(False):
            before, _ = bench_ours(ours, cfg, B, prompt, steps)
        step, uniq = bench_ours(ours, cfg, B, prompt, steps)
        floor = weight_bytes(ours, cfg, uniq, B, prompt + steps) / bw
        row = dict(batch=B, before_ms=before * 1e3, raymoe_ms=step * 1e3, floor_ms=floor * 1e3,
                   pct_floor=100 * floor / step, unique_experts=uniq, tokens_per_s=B / step)
        if B in peer_batches:
            for name, static in (("hf_static_ms", True), ("hf_dynamic_ms", False)):
                try:
                    row[name] = bench_hf_generate(hf, cfg, B, prompt, hf_steps, static) * 1e3
                except Exception as e:                      # noqa: BLE001 - report the peer's failure, keep going
                    print(f"transformers generate ({name}) failed at batch {B}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}", flush=True)
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    print("\n| batch | raymoe before ms/step | raymoe ms/step | floor ms | raymoe % of floor "
          "| transformers static+compile ms/step | transformers dynamic ms/step | raymoe vs best transformers "
          "| raymoe tokens/s | experts/layer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        hs, hd = r.get("hf_static_ms"), r.get("hf_dynamic_ms")
        peers = [x for x in (hs, hd) if x is not None]
        ratio = f"{min(peers) / r['raymoe_ms']:.2f}x" if peers else "-"
        f = lambda x: "-" if x is None else f"{x:.2f}"                      # noqa: E731
        print(f"| {r['batch']} | {r['before_ms']:.2f} | {r['raymoe_ms']:.2f} | {r['floor_ms']:.2f} | "
              f"{r['pct_floor']:.1f}% | {f(hs)} | {f(hd)} | {ratio} | {r['tokens_per_s']:.0f} | "
              f"{r['unique_experts']:.0f} |")
    return rows


def bench_fp8_steps(ours, cfg, bw: float, batches: list[int], prompt: int, steps: int) -> list[dict]:
    """The same model's engine steps with bf16 weights and with FP8 weights (`fp8_twin`), each against its own
    floor, in the same run; and how far the FP8 model's logits are from the bf16 model's."""
    t = time.perf_counter()
    twin = fp8_twin(ours, cfg)
    n8 = sum(p.numel() for p in twin.parameters() if p.dtype == torch.float8_e4m3fn)
    print(f"quantised {n8 / 1e9:.2f}B weights to FP8 in {time.perf_counter() - t:.0f}s", flush=True)
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)).to(DEV)
    with torch.no_grad():
        l16, l8 = ours(ids).float(), twin(ids).float()
    rel = ((l8 - l16).norm() / l16.norm()).item()
    agree = (l8.argmax(-1) == l16.argmax(-1)).float().mean().item()
    print(f"FP8 vs bf16 logits ({cfg.num_hidden_layers} layers, 64 tokens): {rel:.3f} rel err, argmax agreement "
          f"{agree:.2f}", flush=True)
    rows = []
    for B in batches:
        t16, u16 = bench_ours(ours, cfg, B, prompt, steps)
        t8, u8 = bench_ours(twin, cfg, B, prompt, steps)
        f16 = weight_bytes(ours, cfg, u16, B, prompt + steps) / bw
        f8 = weight_bytes(twin, cfg, u8, B, prompt + steps) / bw
        rows.append(dict(batch=B, bf16_ms=t16 * 1e3, fp8_ms=t8 * 1e3, ratio=t8 / t16, bf16_floor_ms=f16 * 1e3,
                         fp8_floor_ms=f8 * 1e3, bf16_pct_floor=100 * f16 / t16, fp8_pct_floor=100 * f8 / t8,
                         unique_experts=u8, fp8_vs_bf16_rel=rel, fp8_vs_bf16_argmax=agree))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| batch | bf16 ms/step | FP8 ms/step | FP8 / bf16 | bf16 floor ms | FP8 floor ms | bf16 % of floor "
          "| FP8 % of floor | experts/layer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch']} | {r['bf16_ms']:.2f} | {r['fp8_ms']:.2f} | {r['ratio']:.2f} | {r['bf16_floor_ms']:.2f} "
              f"| {r['fp8_floor_ms']:.2f} | {r['bf16_pct_floor']:.0f}% | {r['fp8_pct_floor']:.0f}% | "
              f"{r['unique_experts']:.0f} |")
    del twin
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="steps", help="comma list of: kernel, fp8, fp8tune, steps, long, "
                    "fidelity, profile, fp8steps")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hf-steps", type=int, default=16)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--peer-batches", default="1,8", help="batches the transformers peer runs at (steps section)")
    ap.add_argument("--fp8-batches", default="1,32", help="fp8steps section")
    ap.add_argument("--contexts", default="8192,32768,131072", help="kernel and long sections")
    ap.add_argument("--kernel-batches", default="1,8,32,64")
    ap.add_argument("--long-batches", default="1,8")
    ap.add_argument("--no-sweep", action="store_true", help="kernel section: skip the tile sweep")
    ap.add_argument("--profile-batches", default="1,32", help="profile section")
    ap.add_argument("--tune-rows", default="1,32", help="fp8tune: rows of the linear GEMMs")
    ap.add_argument("--tune-batches", default="1,8,32", help="fp8tune: decode batches of the expert GEMMs (top-8)")
    ap.add_argument("--no-write", action="store_true", help="fp8tune: do not write fp8_tiles.json")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="small dims on the CPU: checks the script, times nothing")
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    ints = lambda x: [int(v) for v in x.split(",") if v]                   # noqa: E731
    if a.smoke:
        global DEV
        DEV = "cpu"
        torch.cuda.synchronize = lambda: None
        bw, tf = 1e11, 1.0
    else:
        bw, tf = copy_bandwidth(), matmul_tflops()[0]
        print(f"device {torch.cuda.get_device_name()} | copy bandwidth {bw / 1e12:.2f} TB/s | "
              f"bf16 matmul {tf:.0f} TFLOP/s", flush=True)
    result = dict(copy_bw=bw, matmul_tflops=tf, layers=a.layers, prompt=a.prompt)
    if "kernel" in sections:
        result["kernel"] = bench_kernel(bw, tf, ints(a.contexts), ints(a.kernel_batches), sweep=not a.no_sweep)
    if "fp8tune" in sections:
        result["fp8tune"] = bench_fp8_tune(ints(a.tune_rows), ints(a.tune_batches), write=not a.no_write)
    if "fp8" in sections:
        result["fp8"] = bench_fp8(bw, [1, 32])
    if sections & {"steps", "long", "fidelity", "profile", "fp8steps"}:
        t = time.perf_counter()
        hf, ours, cfg = build(a.layers, a.smoke)
        print(f"built {a.layers} full-width layers ({sum(p.numel() for p in ours.parameters()) / 1e9:.1f}B params) "
              f"in {time.perf_counter() - t:.0f}s", flush=True)
        if "fidelity" in sections:
            result["fidelity"] = fidelity(hf, ours, cfg)
        if "steps" in sections:
            result["steps"] = bench_steps(hf, ours, cfg, bw, ints(a.batches), a.prompt, a.steps, ints(a.peer_batches),
                                          a.hf_steps)
        if "profile" in sections:
            result["profile"] = [profile_step(ours, cfg, B, a.prompt) for B in ints(a.profile_batches)]
        if "long" in sections:
            result["long"] = bench_long(ours, cfg, bw, ints(a.contexts), ints(a.long_batches), a.steps)
        if "fp8steps" in sections:
            result["fp8steps"] = bench_fp8_steps(ours, cfg, bw, ints(a.fp8_batches), a.prompt, a.steps)
    if a.out:
        with open(f"{a.out}/gpu_decode_{'_'.join(sorted(sections))}_{a.layers}l.json", "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
