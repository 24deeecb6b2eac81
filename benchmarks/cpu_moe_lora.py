"""Forward + backward of one MoE layer under LoRA on the CPU: raymoe (finetune.lora, routed-expert LoRA factored in
the grouped products) against transformers' DeepseekV3MoE with PEFT, as bench_finetune's plain loop applies it.

The tiny preset in fp32 (16 experts top-4, hidden 64, moe_intermediate 32, one shared expert), LoRA on every MLP
weight of the layer (`--rank`, default 8, as finetune/configs/tiny-lora.yaml), `--tokens` rows (512: one micro-batch
of bench_finetune), one intra-op thread (what each Ray worker has). The two layers run alternately, so load on the
machine hits both alike; the median and the minimum of `--repeats` pairs are printed, for the whole layer and for
the routed experts alone (routing computed outside the timed region).

    python benchmarks/cpu_moe_lora.py [--tokens 512] [--rank 8] [--repeats 60]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def layers(ckpt: Path, rank: int):
    """(raymoe MoE layer 1, transformers MoE layer 1), each inside its PEFT-wrapped model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from raymoe.finetune.config import LoraConfigSpec
    from raymoe.finetune.lora import apply_lora, plan_lora, saved_config, train_config
    from raymoe.platform.model import from_pretrained

    spec = LoraConfigSpec(rank=rank, alpha=2 * rank, targets=["all"])
    ours = from_pretrained(ckpt, dtype=torch.float32)
    plan = plan_lora(ours, spec)
    ours = apply_lora(ours, spec, plan, seed=0).get_base_model()
    config = saved_config(train_config(plan, spec))
    config.inference_mode = False
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), config)
    ours.train()
    theirs.train()
    return ours.model.layers[1].mlp, theirs.base_model.model.model.layers[1].mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from raymoe.platform.checkpoint import TinySpec, write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = layers(write_tiny_checkpoint(Path(tmp) / "tiny32", TinySpec(seed=0, dtype="float32")),
                              args.rank)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, ours.gate.weight.shape[1], generator=g)
    grad = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        ids, w, _ = ours.gate(x)
        _, w_hf, ids_hf = theirs.gate(x[None])

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.clone().requires_grad_(True)

    runs = {
        "moe_layer_raymoe": lambda: ours(leaf(x)).backward(grad),
        "moe_layer_transformers_peft": lambda: theirs(leaf(x[None])).backward(grad[None]),
        "routed_experts_raymoe": lambda: ours.dispatch(1, leaf(x), ids, leaf(w)).backward(grad),
        "routed_experts_transformers_peft": lambda: theirs.experts(leaf(x), ids_hf, leaf(w_hf)).backward(grad),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        for _ in range(3):
            fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out = {"tokens": args.tokens, "rank": args.rank, "threads": 1, "torch": torch.__version__,
           "ms": {k: {"median": round(statistics.median(v) * 1e3, 3), "min": round(min(v) * 1e3, 3)}
                  for k, v in times.items()}}
    for part in ("moe_layer", "routed_experts"):
        out[f"{part}_speedup_median"] = round(out["ms"][f"{part}_transformers_peft"]["median"]
                                              / out["ms"][f"{part}_raymoe"]["median"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
