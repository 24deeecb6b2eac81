"""GPU decode benchmark: a full-width DeepSeek-V3 stack of a few layers (hidden 7168, 256 experts, MLA dims,
random bf16 weights) decoding at batch 1, 8, 32 through raymoe's engine, against the memory-bandwidth floor and
against transformers' DeepseekV3ForCausalLM holding the very same weight tensors, in the same run.

    PYTHONPATH=src python benchmarks/gpu_decode.py [--layers 4] [--prompt 512] [--steps 30] [--out DIR]

The floor of a decode step = bytes it must read (every attention/dense/shared weight, the routed experts the batch
actually selects, the gates, the LM head, the embedding rows, the latent cache) / measured device copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


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


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * 20 / (time.perf_counter() - t) / 1e12


DEV = "cuda"
SMOKE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
             num_attention_heads=4, num_key_value_heads=4, n_routed_experts=32, kv_lora_rank=64, q_lora_rank=64,
             qk_rope_head_dim=32, v_head_dim=32, qk_nope_head_dim=32)


def build(layers: int, smoke: bool = False):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM as HF

    from raymoe.platform.config import ModelConfig
    from raymoe.platform.model import DeepseekV3ForCausalLM
    dims = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                num_hidden_layers=layers, first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128,
                n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512,
                q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
                topk_group=4, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=163840,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
    if smoke:
        dims.update(SMOKE)
    rope = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                mscale=1.0, mscale_all_dim=1.0)
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


def weight_bytes(ours, cfg, unique_experts: float, batch: int, ctx: int) -> float:
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
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
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
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


def bench_hf(hf, cfg, batch: int, prompt: int, steps: int) -> float:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=g).to(DEV)
    with torch.no_grad():
        out = hf(ids, use_cache=True)
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for i in range(steps + 2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = hf(nxt, past_key_values=cache, use_cache=True)
            cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
    del cache, out
    torch.cuda.empty_cache()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hf-steps", type=int, default=8)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="small dims on the CPU: checks the script, times nothing")
    a = ap.parse_args()
    if a.smoke:
        global DEV
        DEV = "cpu"
        torch.cuda.synchronize = lambda: None
        bw, tf = 1e11, 1.0
    else:
        bw, tf = copy_bandwidth(), matmul_tflops()
        print(f"device {torch.cuda.get_device_name()} | copy bandwidth {bw / 1e12:.2f} TB/s | "
              f"bf16 matmul {tf:.0f} TFLOP/s", flush=True)
    t = time.perf_counter()
    hf, ours, cfg = build(a.layers, a.smoke)
    print(f"built {a.layers} full-width layers ({sum(p.numel() for p in ours.parameters()) / 1e9:.1f}B params) "
          f"in {time.perf_counter() - t:.0f}s", flush=True)
    with torch.no_grad():   # same weights, same function: a bf16-level agreement check before timing
        ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)).to(DEV)
        lo, lh = ours(ids).float(), hf(ids).logits.float()
        print(f"raymoe vs transformers logits, same weights (bf16): rel err {((lo - lh).norm() / lh.norm()).item():.2e}, "
              f"argmax agreement {(lo.argmax(-1) == lh.argmax(-1)).float().mean().item():.2f}", flush=True)
        del lo, lh
    rows = []
    for B in [int(x) for x in a.batches.split(",")]:
        step, uniq = bench_ours(ours, cfg, B, a.prompt, a.steps)
        floor = weight_bytes(ours, cfg, uniq, B, a.prompt + a.steps) / bw
        hf_step = bench_hf(hf, cfg, B, a.prompt, a.hf_steps)
        rows.append(dict(batch=B, raymoe_ms=step * 1e3, floor_ms=floor * 1e3, pct_floor=100 * floor / step,
                         hf_ms=hf_step * 1e3, speedup=hf_step / step, hf_pct_floor=100 * floor / hf_step,
                         unique_experts=uniq, tokens_per_s=B / step))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| batch | raymoe ms/step | floor ms | raymoe % of floor | transformers ms/step | transformers % of floor "
          "| speedup | raymoe tokens/s | experts touched/layer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch']} | {r['raymoe_ms']:.2f} | {r['floor_ms']:.2f} | {r['pct_floor']:.1f}% | {r['hf_ms']:.1f} "
              f"| {r['hf_pct_floor']:.1f}% | {r['speedup']:.1f}x | {r['tokens_per_s']:.0f} | {r['unique_experts']:.0f} |")
    if a.out:
        with open(f"{a.out}/gpu_decode.json", "w") as f:
            json.dump(dict(copy_bw=bw, matmul_tflops=tf, rows=rows, layers=a.layers, prompt=a.prompt), f, indent=1)


if __name__ == "__main__":
    main()
