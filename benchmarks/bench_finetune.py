"""Finetuning throughput: raymoe's Ray Train LoRA job against a plain transformers + PEFT training loop.

Same tiny checkpoint, same token rows (finetune.tokens), same LoRA (the LoraConfig raymoe builds, applied by
PEFT to transformers' DeepseekV3ForCausalLM), same micro-batch (4 rows of 128 packed tokens) and global batch
(8 rows), same AdamW and schedule, fp32 on CPU with one intra-op thread per process (what each Ray worker has).
Tokens/s are real (unpadded) tokens over the time spent in optimizer steps, skipping the first `--warmup` steps;
raymoe's figure is per worker (each of W workers processes 1/W of every global batch). Because the machine may be
shared, each configuration runs `--repeats` times, interleaved, and the best run counts; tokens per CPU-second of
the training process (process_time) is reported beside wall-clock tokens/s, as it is far less sensitive to other
load on the machine. Two raymoe workers are compared with two copies of the plain loop running at once (per
process), which is what two processes get from this machine; one worker with one plain loop.

    python benchmarks/bench_finetune.py [--steps 40] [--workers 2 1] [--repeats 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def synthetic_chat(path: Path, n: int = 512) -> Path:
    """Arithmetic questions and answers: enough distinct rows for many packed batches."""
    with path.open("w") as f:
        for i in range(n):
            a, b = i % 37, (i * 7) % 23
            msgs = [{"role": "user", "content": f"What is {a} plus {b}? Answer with the number."},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def job_for(model: Path, data: Path, out: Path, steps: int, workers: int):
    from raymoe.finetune.config import load_job
    return load_job(REPO / "finetune/configs/tiny-lora.yaml", [
        f"model={model}", f"data.train={data}", f"output_dir={out}", "data.packing=true", "data.max_seq_len=128",
        "batch.global_size=8", "batch.micro_size=4", f"max_steps={steps}", f"scaling.num_workers={workers}",
        "log_every=1000", "checkpoint.every_steps=1000", "optim.lr=0.003"])


def rates(steps: list[dict], warmup: int) -> dict:
    """Per worker, over the steps after warmup: tokens per wall second and per CPU second, median step time."""
    kept = steps[warmup:]
    workers = kept[0].get("workers", 1)
    tokens = sum(s["tokens"] for s in kept) / workers
    return {"tokens_per_s_per_worker": tokens / sum(s["step_time_s"] for s in kept),
            "tokens_per_cpu_s_per_worker": tokens / sum(s["step_cpu_s"] for s in kept),
            "median_step_s": statistics.median(s["step_time_s"] for s in kept), "final_loss": steps[-1]["loss"]}


def raymoe_run(job) -> list[dict]:
    from raymoe.finetune.launcher import run
    run(job)
    return [json.loads(line) for line in (Path(job.output_dir) / "metrics.jsonl").read_text().splitlines()]


def transformers_step(job, prepared):
    """The plain loop's step, as a transformers + PEFT user writes it: transformers' model, PEFT's
    get_peft_model with the adapter's own config, the same rows, batches, AdamW and schedule."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from raymoe.finetune.batches import BatchPlan, collate
    from raymoe.finetune.lora import plan_lora, saved_config, train_config
    from raymoe.finetune.train_loop import lr_factor
    from raymoe.platform.model import from_pretrained

    plan = plan_lora(from_pretrained(job.model, dtype=torch.float32), job.lora)
    model = AutoModelForCausalLM.from_pretrained(job.model, dtype=torch.float32)
    torch.manual_seed(job.seed)
    config = saved_config(train_config(plan, job.lora))
    config.inference_mode = False
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, job.max_steps, job.optim.warmup_steps, job.optim.min_lr_ratio))
    batches = BatchPlan(len(prepared.train), job.batch.global_size, job.batch.micro_size, 1, 0, job.seed)
    lengths = prepared.train.row_counts()[0]

    def step(i: int) -> dict:
        t0, cpu0 = time.perf_counter(), time.process_time()
        micro = [collate(prepared.train, idx, prepared.pad_id) for idx in batches.micro_batches(i)]
        n = sum(float(m[:, 1:].sum()) for _, m in micro)
        total = 0.0
        for ids, mask in micro:
            logits = model(input_ids=ids).logits[:, :-1]
            sel = mask[:, 1:].bool()
            loss = torch.nn.functional.cross_entropy(logits[sel].float(), ids[:, 1:][sel], reduction="sum") / n
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, job.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return {"step": i + 1, "loss": total, "tokens": int(lengths[batches.step_rows(i)].sum()),
                "step_time_s": time.perf_counter() - t0, "step_cpu_s": time.process_time() - cpu0, "workers": 1}
    return step


def raymoe_step(job, prepared):
    """raymoe's own training step (finetune.train_loop.StepRunner) in this process, without Ray (one worker)."""
    from raymoe.finetune.balance import ExpertLoad
    from raymoe.finetune.batches import BatchPlan
    from raymoe.finetune.objective import CausalLMObjective, base_model
    from raymoe.finetune.train_loop import StepRunner, build_model, lr_factor

    cpu = torch.device("cpu")
    net, params = build_model(job, cpu)
    opt = torch.optim.AdamW(params, lr=job.optim.lr, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, job.max_steps, job.optim.warmup_steps, job.optim.min_lr_ratio))
    plan = BatchPlan(len(prepared.train), job.batch.global_size, job.batch.micro_size, 1, 0, job.seed)
    base = base_model(net)
    load = ExpertLoad([m for m in base.moe_layers() if m.layer < base.config.num_hidden_layers])
    runner = StepRunner(job, CausalLMObjective(net), params, opt, sched, plan, prepared.train, prepared.pad_id,
                        load, cpu, 1)
    return runner.run


def transformers_run(job) -> list[dict]:
    torch.set_num_threads(1)
    from raymoe.finetune.launcher import preflight
    step = transformers_step(job, preflight(job))
    return [step(i) for i in range(job.max_steps)]


def interleaved(job) -> dict:
    """raymoe's step and the plain loop's step alternating in one process, one thread: load on the machine
    hits both alike. The per-step time ratios' median is the per-token speed ratio."""
    torch.set_num_threads(1)
    from raymoe.finetune.launcher import preflight
    prepared = preflight(job)
    ours, theirs = raymoe_step(job, prepared), transformers_step(job, prepared)
    pairs = [(ours(i), theirs(i)) for i in range(job.max_steps)][5:]
    return {"median_speed_ratio": statistics.median(t["step_time_s"] / o["step_time_s"] for o, t in pairs),
            "median_cpu_ratio": statistics.median(t["step_cpu_s"] / o["step_cpu_s"] for o, t in pairs),
            "raymoe_tokens_per_s": sum(o["tokens"] for o, _ in pairs) / sum(o["step_time_s"] for o, _ in pairs),
            "transformers_tokens_per_s": sum(t["tokens"] for _, t in pairs) / sum(t["step_time_s"] for _, t in pairs),
            "final_loss": (pairs[-1][0]["loss"], pairs[-1][1]["loss"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)

    import ray

    from raymoe.platform.checkpoint import TinySpec, write_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench-ft-"))
    model = write_tiny_checkpoint(tmp / "tiny", TinySpec(dtype="float32"))
    data = synthetic_chat(tmp / "chat.jsonl")
    runs: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        for w in args.workers:
            steps = raymoe_run(job_for(model, data, tmp / f"raymoe-{w}-{r}", args.steps, w))
            runs.setdefault(f"raymoe_{w}_workers", []).append(rates(steps, args.warmup))
        ray.shutdown()
        steps = transformers_run(job_for(model, data, tmp / f"hf-{r}", args.steps, 1))
        runs.setdefault("transformers_peft", []).append(rates(steps, args.warmup))
        if 2 in args.workers:           # the same loop twice at once: what two processes get on this machine
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
                jobs = [job_for(model, data, tmp / f"hf2-{r}-{i}", args.steps, 1) for i in range(2)]
                both = [rates(s, args.warmup) for s in pool.map(transformers_run, jobs)]
            runs.setdefault("transformers_peft_2_processes", []).append(
                {k: sum(b[k] for b in both) / 2 for k in both[0]})
    results = {k: {"best_tokens_per_s_per_worker": max(x["tokens_per_s_per_worker"] for x in v),
                   "best_tokens_per_cpu_s_per_worker": max(x["tokens_per_cpu_s_per_worker"] for x in v),
                   "runs": v} for k, v in runs.items()}
    for name, v in results.items():     # 2 workers against 2 concurrent processes; anything else against one
        base = results["transformers_peft_2_processes" if name.startswith("raymoe_2") and
                       "transformers_peft_2_processes" in results else "transformers_peft"]
        v["ratio_vs_transformers"] = v["best_tokens_per_s_per_worker"] / base["best_tokens_per_s_per_worker"]
        v["cpu_ratio_vs_transformers"] = (v["best_tokens_per_cpu_s_per_worker"]
                                          / base["best_tokens_per_cpu_s_per_worker"])
    report_interleaved = interleaved(job_for(model, data, tmp / "ab", args.steps * 2, 1))
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "torch": torch.__version__, "steps": args.steps, "warmup_skipped": args.warmup,
              "micro_batch": "4 x 128 packed tokens", "global_batch": 8, "results": results,
              "interleaved_in_process": report_interleaved}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
