"""Multi-LoRA decode benchmark: 32 concurrent requests, each on one of 8 adapters (rank 16, every target: attention,
dense and shared MLPs, routed experts), served in the same batches by per-row LoRA, against the base model alone
and against the old way (merge one adapter into the weights, serve its requests, unmerge, the next), in one run.

    PYTHONPATH=src python benchmarks/multi_lora.py                      # CPU, the tiny preset, cpu_compile
    PYTHONPATH=src python benchmarks/multi_lora.py --device cuda        # one GPU, full-width layers, CUDA graphs

Per mode: decode tokens/s (median decode step of the 32 requests after their prefill) and workload tokens/s (the
whole workload: every request's prompt and `--tokens` greedy tokens, wall time, merges included for the old way).
The adapters are random factors written in PEFT's file layout (what `raymoe.finetune` saves) and read through the
engine's adapter reader. On the CPU the base and multi-LoRA runs use `cpu_compile` (the best CPU mode); the old way
runs eager, since the compiled step freezes the weights it would merge into (a merge there means a new engine and a
new compilation).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

N_ADAPTERS, CONCURRENCY, RANK = 8, 32, 16


def write_random_adapter(model, path: Path, rank: int, seed: int, std: float = 0.02) -> Path:
    """A PEFT LoRA adapter of `model` on every target finetuning supports (main layers' nn.Linear weights, stacked
    routed experts), in the layout PEFT 0.21 writes (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file
    from torch import nn

    from raymoe.platform.model.moe import RoutedExperts
    g = torch.Generator().manual_seed(seed)
    tensors, modules, params = {}, [], []

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)
    for i, layer in enumerate(model.model.layers):
        for name, mod in layer.named_modules(prefix=f"model.layers.{i}"):
            key = f"base_model.model.{name}"
            if isinstance(mod, nn.Linear):
                modules.append(name)
                tensors[f"{key}.lora_A.weight"] = rnd(rank, mod.in_features)
                tensors[f"{key}.lora_B.weight"] = rnd(mod.out_features, rank)
            elif isinstance(mod, RoutedExperts):
                E = mod.n_total
                for nest, w in (("", "gate_up_proj"), (".base_layer", "down_proj")):
                    _, out_f, in_f = getattr(mod, w).shape
                    params.append(f"{name}.{w}")
                    tensors[f"{key}{nest}.lora_A.weight"] = rnd(E * rank, in_f)
                    tensors[f"{key}{nest}.lora_B.weight"] = rnd(out_f, E * rank)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=rank, lora_alpha=2 * rank, target_modules=modules, target_parameters=params,
        bias="none", task_type="CAUSAL_LM")))
    return path


def engine(model, ckpt: str, device: str, compiled: bool, blocks: int, max_len: int, max_loras: int,
           eager: bool = False):
    from raymoe.platform.config import EngineConfig
    from raymoe.platform.engine import LLMEngine
    return LLMEngine(EngineConfig(model=ckpt, device=device, block_size=16, num_blocks=blocks, max_model_len=max_len,
                                  max_num_seqs=CONCURRENCY, enable_prefix_caching=False, cpu_compile=compiled,
                                  enforce_eager=eager,
                                  cuda_graph_sizes=[4, 8, 16, 32], max_num_batched_tokens=2048,
                                  max_loras=max_loras, max_lora_rank=RANK), model=model)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(eng, prompts, adapters, tokens: int, device: str) -> tuple[float, float]:
    """All requests at once -> (median decode step seconds, wall seconds of the whole run)."""
    from raymoe.platform.config import SamplingParams
    sync(device)
    t0 = time.perf_counter()
    for i, (p, a) in enumerate(zip(prompts, adapters)):
        eng.add_request(f"r{i}-{time.monotonic_ns()}", p, SamplingParams(temperature=0, max_tokens=tokens,
                                                                          ignore_eos=True, adapter=a))
    steps = []
    while eng.has_unfinished():
        decode = not eng.scheduler.waiting and all(s.num_uncomputed == 1 for s in eng.scheduler.running)
        t = time.perf_counter()
        eng.step()
        sync(device)
        if decode:
            steps.append(time.perf_counter() - t)
    return statistics.median(steps[2:] or steps), time.perf_counter() - t0


def old_way(eng, prompts, paths, tokens: int, device: str) -> tuple[float, float]:
    """Merge adapter k, serve its requests, unmerge; the next. -> (median decode step at its concurrency, wall)."""
    from raymoe.platform.checkpoint.adapter import merge_adapter, read_adapter, unmerge_adapter
    sync(device)
    t0 = time.perf_counter()
    steps = []
    for k, path in enumerate(paths):
        adapter = read_adapter(path)
        originals = merge_adapter(eng.model, adapter)
        mine = prompts[k::len(paths)]
        step, _ = run(eng, mine, [None] * len(mine), tokens, device)
        steps.append(step)
        unmerge_adapter(eng.model, adapter, originals)
        del adapter
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    sync(device)
    return statistics.median(steps), time.perf_counter() - t0


def profile(model, ckpt, a, blocks, max_len, prompts, names, paths) -> None:
    """Where a decode step's time goes: the profiler's table of an eager engine's decode steps, base and multi-LoRA
    (eager, so each kernel shows; CUDA graphs remove launch gaps, not kernel time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    eng = engine(model, ckpt, a.device, False, blocks, max_len, N_ADAPTERS, eager=True)
    for name, path in zip(sorted(set(names)), paths):
        eng.load_adapter(name, path)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
    for mode, ads in (("base model alone", [None] * CONCURRENCY), ("multi-LoRA, 8 adapters", names)):
        run(eng, prompts, ads, 4, a.device)
        step, _ = run(eng, prompts, ads, 8, a.device)
        with torch_profile(activities=acts) as prof:
            run(eng, prompts, ads, 8, a.device)
        key = "self_cuda_time_total" if a.device.startswith("cuda") else "self_cpu_time_total"
        print(f"\n## {mode}: eager median decode step {step * 1e3:.2f} ms (profiled run: prefill + 8 steps)")
        print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))


def build_cpu(root: Path):
    from raymoe.platform.checkpoint import TinySpec, write_tiny_checkpoint
    from raymoe.platform.model import from_pretrained
    ckpt = write_tiny_checkpoint(root / "tiny", TinySpec(seed=0, dtype="float32"))
    return lambda: from_pretrained(ckpt, dtype=torch.float32), str(ckpt)


def build_cuda(layers: int):
    from gpu_decode import build
    _, ours, _ = build(layers)
    return lambda: ours, "bench"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=3, help="full-width layers on CUDA (1 dense, the rest MoE)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="instead: kernel tables of eager base and multi-LoRA steps")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    root = Path(tempfile.mkdtemp(prefix="multi_lora_"))
    make, ckpt = build_cuda(a.layers) if cuda else build_cpu(root)
    model = make()
    cfg = model.config
    paths = [str(write_random_adapter(model, root / f"a{k}", RANK, seed=k)) for k in range(N_ADAPTERS)]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (a.prompt,), generator=g).tolist() for _ in range(CONCURRENCY)]
    names = [f"a{i % N_ADAPTERS}" for i in range(CONCURRENCY)]       # request i on adapter i mod 8
    max_len = a.prompt + a.tokens + 16
    blocks = CONCURRENCY * -(-max_len // 16) + 8
    rows = {}

    if a.profile:
        return profile(model, ckpt, a, blocks, max_len, prompts, names, paths)
    # base model alone and multi-LoRA: one engine (the best mode: cpu_compile / CUDA graphs), warmed up first
    eng = engine(model, ckpt, a.device, not cuda, blocks, max_len, N_ADAPTERS)
    for name, path in zip(sorted(set(names)), paths):
        eng.load_adapter(name, path)
    t = time.perf_counter()
    run(eng, prompts, [None] * CONCURRENCY, 4, a.device)               # compile / capture, not timed
    run(eng, prompts, names, 4, a.device)
    print(f"warm-up (compile / capture) {time.perf_counter() - t:.1f}s", flush=True)
    for mode, ads in (("base model alone", [None] * CONCURRENCY), ("multi-LoRA, 8 adapters", names),
                      ("base model alone (again)", [None] * CONCURRENCY)):
        step, wall = run(eng, prompts, ads, a.tokens, a.device)
        rows[mode] = dict(decode_tok_s=CONCURRENCY / step, step_ms=step * 1e3,
                          workload_tok_s=CONCURRENCY * a.tokens / wall)
        print(mode, json.dumps(rows[mode]), flush=True)
    stats = eng.stats()["adapters"]
    del eng
    # the old way: merge one adapter at a time into the weights (eager on the CPU: a compiled step froze them)
    eng = engine(model if cuda else make(), ckpt, a.device, False, blocks, max_len, N_ADAPTERS)
    run(eng, prompts[:4], [None] * 4, 4, a.device)
    step, wall = old_way(eng, prompts, paths, a.tokens, a.device)
    rows["old way: merge one adapter at a time"] = dict(decode_tok_s=(CONCURRENCY // N_ADAPTERS) / step,
                                                        step_ms=step * 1e3,
                                                        workload_tok_s=CONCURRENCY * a.tokens / wall)
    print("old way", json.dumps(rows["old way: merge one adapter at a time"]), flush=True)
    base = rows["base model alone"]
    where = (f"{torch.cuda.get_device_name()}, {a.layers} full-width layers, bf16, CUDA graphs" if cuda else
             f"CPU, tiny preset fp32, {torch.get_num_threads()} threads, cpu_compile (old way: eager)")
    print(f"\n{where}; concurrency {CONCURRENCY}, {N_ADAPTERS} adapters rank {RANK} (all targets), prompt "
          f"{a.prompt}, {a.tokens} tokens each; adapter pool {stats}")
    print("| mode | decode tokens/s | ms/decode step | vs base (decode) | workload tokens/s | vs base (workload) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, r in rows.items():
        print(f"| {mode} | {r['decode_tok_s']:.0f} | {r['step_ms']:.2f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f}x "
              f"| {r['workload_tok_s']:.0f} | {r['workload_tok_s'] / base['workload_tok_s']:.2f}x |")
    multi, old = rows["multi-LoRA, 8 adapters"], rows["old way: merge one adapter at a time"]
    print(f"multi-LoRA / old way (workload): {multi['workload_tok_s'] / old['workload_tok_s']:.2f}x")
    if a.out:
        Path(a.out, f"multi_lora_{'cuda' if cuda else 'cpu'}.json").write_text(json.dumps(
            dict(where=where, rows=rows, prompt=a.prompt, tokens=a.tokens), indent=1))


if __name__ == "__main__":
    main()
