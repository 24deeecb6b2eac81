"""LoRA forward + backward through full-width DeepSeek-V3 decoder layers on one GPU, against the measured bf16
matmul rate of the same GPU in the same run.

Builds raymoe decoder layers at the release's sizes (hidden 7168, MLA with q_lora_rank 1536 / kv_lora_rank 512 and
128 heads, a dense layer with intermediate 18432, an MoE layer with 256 routed experts of 2048, top-8 in 4 of 8
groups, one shared expert) with random bf16 weights, applies LoRA exactly as finetuning does (finetune.lora:
PEFT module LoRA on the attention projections, PEFT target_parameters on the MLP weights and the stacked
experts), and times forward + backward of a random activation batch with the base frozen, under the objective's
bf16 autocast (`finetune.objective.mixed_precision`). Useful FLOPs per token are counted as finetuning needs them:
the forward matmuls (attention projections, causal attention, the MLP or the 8 routed + 1 shared experts actually
selected, the gate, LoRA) plus the same again for the input gradients, plus the LoRA weight gradients; no base
weight gradients. Anything else the implementation does (for
example PEFT materialising W + BA for the whole expert stack and its gradient) shows up as lost efficiency.
Each layer is also timed, in the same run, as a baseline without finetune.linear_lora and platform.model.fused
(PEFT's own nn.Linear LoRA forward, every elementwise op eager). Fractions are of the burst matmul rate (the first
products of an idle GPU, the higher figure) and of the sustained rate measured after the layers (see
common.matmul_tflops).

    python benchmarks/gpu_lora_layers.py                 # on an H200: one dense and one MoE layer, 16K tokens
    python benchmarks/gpu_lora_layers.py --small         # CPU smoke test at toy width
    python benchmarks/gpu_lora_layers.py --profile moe   # + the kernels of one MoE step, by CUDA time
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import V3_DIMS, YARN, matmul_tflops, timed  # noqa: E402

FULL = {**V3_DIMS, "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
        "rope_scaling": YARN}
SMALL = dict(FULL, vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
             num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
             v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)


class LayerStack(nn.Module):
    """Decoder layers only (HF names model.layers.L...), so finetune.lora plans and applies LoRA as in a job."""

    def __init__(self, cfg, kinds: list[str]) -> None:
        super().__init__()
        from raymoe.platform.model.decoder import DecoderLayer
        from raymoe.platform.model.rope import RotaryEmbedding
        self.config = cfg
        self.rope = RotaryEmbedding(cfg)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, i, self.rope, moe=(k == "moe"))
                                          for i, k in enumerate(kinds))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, hidden] -> [B, T, hidden]
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device).expand(B, T)
        for layer in self.model.layers:
            x = layer(x, positions)
        return x


def build(cfg, kind: str, device: str, dtype: torch.dtype) -> LayerStack:
    with torch.device("meta"):
        stack = LayerStack(cfg, [kind])
    stack.to_empty(device=device)
    stack.to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in stack.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            for w in (p if p.dim() == 3 else [p]):                  # one expert at a time: no fp32 stack copy
                w.copy_(torch.randn(w.shape, generator=g, device=device) / math.sqrt(w.shape[-1]))
        for m in stack.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.zero_()
    return stack


def useful_flops(cfg, kind: str, tokens: int, seq: int, rank: int, lora_params_per_token: int) -> float:
    """Forward + input-gradient matmul FLOPs (2 x forward) + LoRA weight gradients, for one layer."""
    h, H = cfg.hidden_size, cfg.num_attention_heads
    attn = (h * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * h)
    if kind == "dense":
        mlp = 3 * h * cfg.intermediate_size
    else:
        mlp = 3 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts) \
            + h * cfg.n_routed_experts
    core = 2 * (seq / 2) * H * (cfg.qk_head_dim + cfg.v_head_dim)        # causal QK^T and AV per token (MACs x 2)
    fwd = tokens * (2 * (attn + mlp + lora_params_per_token) + core)
    return 2 * fwd + tokens * 4 * lora_params_per_token


def lora_active_params(stack, kind: str, cfg, rank: int) -> int:
    """LoRA parameters a token passes through (experts: only the selected ones)."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper
    total = 0
    for _, mod in stack.named_modules():
        if isinstance(mod, LoraLayer) and len(mod.lora_A):
            a = mod.lora_A["default"].weight
            b = mod.lora_B["default"].weight
            n = a.numel() + b.numel()
            if isinstance(mod, ParamWrapper) and mod.num_experts > 1:
                n = n // mod.num_experts * cfg.num_experts_per_tok
            total += n
    return total


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def profile(fn, device: str, top: int = 30) -> None:
    """Print the kernels of one call by total device time (after a warm-up call)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=90))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="toy width (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="all")
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--layers", default="dense,moe", help="which layer kinds to time")
    ap.add_argument("--profile", default="", help="layer kinds whose fwd+bwd step to profile (e.g. moe)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the same-run baseline (PEFT's own nn.Linear LoRA forward, no fused kernels)")
    args = ap.parse_args()
    from raymoe.finetune import linear_lora
    from raymoe.finetune.config import LoraConfigSpec
    from raymoe.finetune.lora import apply_lora, plan_lora
    from raymoe.platform.model import fused
    from raymoe.finetune.objective import mixed_precision
    from raymoe.platform.config import ModelConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.small:
        args.batch, args.seq, args.iters = min(args.batch, 2), min(args.seq, 64), min(args.iters, 2)
    cfg = ModelConfig.model_validate(SMALL if args.small else FULL)
    n_mm, it_mm = (1024, 3) if args.small else (8192, 20)
    burst, sustained_before = matmul_tflops(device, n_mm, it_mm, blocks=5)
    peak = burst
    spec = LoraConfigSpec(rank=args.rank, alpha=2 * args.rank, targets=args.targets.split(","))
    tokens = args.batch * args.seq
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "tokens": tokens,
               "rank": args.rank, "targets": args.targets, "bf16_matmul_tflops": _sig(peak), "layers": {}}
    for kind in args.layers.split(","):
        stack = build(cfg, kind, device, torch.bfloat16)
        pm = apply_lora(stack, spec, plan_lora(stack, spec), seed=0)
        x = torch.randn(args.batch, args.seq, cfg.hidden_size, device=device, dtype=torch.bfloat16)
        grad = torch.randn_like(x)

        def forward() -> torch.Tensor:
            with mixed_precision(stack):          # as the finetuning objective runs a bf16 model
                return pm.get_base_model()(x)

        def step() -> None:
            forward().backward(grad)
            for p in pm.parameters():
                p.grad = None

        with torch.no_grad():
            fwd_s = timed(forward, device, args.iters)
        step_s = timed(step, device, args.iters)
        if kind in args.profile.split(","):
            profile(step, device)
        flops = useful_flops(cfg, kind, tokens, args.seq, args.rank, lora_active_params(pm, kind, cfg, args.rank))
        tflops = flops / step_s / 1e12
        results["layers"][kind] = {"fwd_ms": _sig(fwd_s * 1e3), "fwd_bwd_ms": _sig(step_s * 1e3),
                                   "useful_tflop": _sig(flops / 1e12), "achieved_tflops": _sig(tflops),
                                   "fraction_of_matmul": _sig(tflops / peak), "tokens_per_s": round(tokens / step_s)}
        if not args.no_baseline:       # the same layer without finetune.linear_lora and platform.model.fused
            linear_lora.uninstall(pm)
            with fused.set_mode("off"):
                base_s = timed(step, device, args.iters)
            linear_lora.install(pm)
            results["layers"][kind]["baseline_fwd_bwd_ms"] = _sig(base_s * 1e3)
            results["layers"][kind]["baseline_fraction_of_matmul"] = _sig(flops / base_s / 1e12 / peak)
            results["layers"][kind]["speedup_vs_baseline"] = _sig(base_s / step_s)
        if device == "cuda":
            results["layers"][kind]["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            torch.cuda.reset_peak_memory_stats()
        del pm, stack, x, grad
        if device == "cuda":
            torch.cuda.empty_cache()
    # fractions of the burst rate (the higher: conservative), and of the sustained one measured after the layers
    sustained = matmul_tflops(device, n_mm, it_mm, blocks=5)[1]
    results["bf16_matmul_tflops"] = {"burst": _sig(burst), "sustained_before": _sig(sustained_before),
                                     "sustained_after": _sig(sustained)}
    for r in results["layers"].values():
        r["fraction_of_sustained_matmul"] = _sig(r["achieved_tflops"] / sustained)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
