"""`train_loop_per_worker`: what each Ray Train worker runs.

Loads the base model from the HF checkpoint, applies LoRA with PEFT (or trains every weight in mode full), wraps
the objective in DDP (gloo on CPU, NCCL on GPU: Ray Train forms the process group), and trains on its slice of
each global batch (finetune.batches) with gradient accumulation. Every `log_every` steps it reports metrics with
`ray.train.report`; every `checkpoint.every_steps` steps and at the end rank 0 also hands over a checkpoint
(finetune.checkpointing). A (re)started worker group resumes from `ray.train.get_checkpoint()`: same weights,
optimizer, schedule and data position, and per-step RNG seeding, so the run continues exactly as if never
interrupted. It does not prepare data (the driver tokenizes once and passes rows through the object store).
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from raymoe.finetune.balance import ExpertLoad
from raymoe.finetune.batches import BatchPlan, collate, eval_batches
from raymoe.finetune.checkpointing import TrainState, read_progress, read_weights, write_checkpoint, write_export
from raymoe.finetune.config import JobConfig
from raymoe.finetune.lora import apply_lora, plan_lora
from raymoe.finetune.objective import CausalLMObjective, base_model, target_counts
from raymoe.finetune.sharding import accumulating, as_float, gather_state, is_sharded, wrap
from raymoe.finetune.tokens import TokenRows


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def total_steps(job: JobConfig, steps_per_epoch: int) -> int:
    return job.max_steps or max(1, math.ceil(job.epochs * steps_per_epoch))


def _all_reduce(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small CPU tensor over workers (through `device`: NCCL reduces only CUDA tensors)."""
    if dist.is_available() and dist.is_initialized():
        on = t.to(device)
        dist.all_reduce(on)
        t.copy_(on)
    return t


def build_model(job: JobConfig, device: torch.device):
    """(net, trainable parameters): the PEFT-wrapped model (lora) or the model itself (full)."""
    from raymoe.platform.model import from_pretrained
    model = from_pretrained(job.model, dtype=getattr(torch, job.dtype), device=device)
    model.train()
    if job.mode == "lora":
        plan = plan_lora(model, job.lora, train_gates=job.update_expert_bias)
        net = apply_lora(model, job.lora, plan, job.seed)
    else:
        net = model
        for p in net.parameters():
            p.requires_grad_(True)
        if job.mtp_loss_weight == 0:
            net.mtp.requires_grad_(False)   # unused without the MTP loss (DDP refuses parameters without grads)
    return net, [p for p in net.parameters() if p.requires_grad]


@torch.no_grad()
def evaluate(objective: CausalLMObjective, rows: TokenRows, micro: int, world: int, rank: int, pad_id: int,
             device: torch.device) -> tuple[float, float]:
    """Mean main and MTP cross-entropy over every validation row (each worker takes a share). Under FSDP2 every
    worker runs as many forwards as the busiest one (the extra ones on a row with no targets)."""
    sums = torch.zeros(4, dtype=torch.float64)
    batches = eval_batches(len(rows), micro, world, rank)
    if is_sharded(objective):
        most = len(eval_batches(len(rows), micro, world, 0))
        batches += [None] * (most - len(batches))
    for idx in batches:
        ids, mask = collate(rows, idx if idx is not None else [0], pad_id)
        if idx is None:
            mask.zero_()
        main, mtp = objective(ids.to(device), mask.to(device))
        n_main, n_mtp = target_counts(mask)
        sums += torch.tensor([main.item(), n_main, mtp.item(), n_mtp], dtype=torch.float64)
    _all_reduce(sums, device)
    return float(sums[0] / sums[1].clamp(min=1)), float(sums[2] / sums[3].clamp(min=1))


@dataclass
class StepRunner:
    """One optimizer step's worth of what a worker needs (built once, used every step)."""

    job: JobConfig
    ddp: torch.nn.Module                 # the objective as `sharding.wrap` returns it (DDP, FSDP2 or bare)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: BatchPlan
    rows: TokenRows
    pad_id: int
    load: ExpertLoad
    device: torch.device
    world: int

    def __post_init__(self) -> None:
        self.row_counts = self.rows.row_counts()

    def run(self, step: int) -> dict:
        """Forward/backward over this worker's micro-batches of `step`, clip, update; the step's metrics."""
        job, world = self.job, self.world
        t0, cpu0 = time.perf_counter(), time.process_time()
        torch.manual_seed(job.seed * 1_000_003 + step * 1009 + self.plan.rank)   # dropout: reproducible per step
        index = self.plan.micro_batches(step)
        micro = [collate(self.rows, idx, self.pad_id) for idx in index]
        n_tokens, n_main, n_mtp = (int(c[self.plan.step_rows(step)].sum()) for c in self.row_counts)
        main_scale = world / max(1, n_main)                                 # every target token of the global
        mtp_scale = job.mtp_loss_weight * world / max(1, n_mtp)             # batch weighs the same; DDP averages
        sums = torch.zeros(2, dtype=torch.float64)
        for i, (ids, mask) in enumerate(micro):
            with accumulating(self.ddp, sync=i == len(micro) - 1):
                main, mtp = self.ddp(ids.to(self.device), mask.to(self.device))
                loss = main * main_scale + (mtp * mtp_scale if job.mtp_loss_weight > 0 else 0)
                loss.backward()
            self.load.collect()
            sums += torch.tensor([main.item(), mtp.item()], dtype=torch.float64)
        lr = self.scheduler.get_last_lr()[0]
        clip = job.optim.grad_clip if job.optim.grad_clip is not None else float("inf")
        grad_norm = as_float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = _all_reduce(torch.cat([sums, self.load.counts.flatten()]), self.device)   # one collective
        imbalance = self.load.finish_step(stats[2:].view_as(self.load.counts), job.update_expert_bias,
                                          job.expert_bias_rate)
        dt = time.perf_counter() - t0
        record = {"step": step + 1, "loss": float(stats[0]) / max(1, n_main), "lr": lr, "grad_norm": grad_norm,
                  "tokens": n_tokens, "tokens_per_s_per_worker": n_tokens / world / dt,
                  "expert_imbalance": imbalance, "step_time_s": dt, "step_cpu_s": time.process_time() - cpu0,
                  "workers": world}
        if job.mtp_loss_weight > 0:
            record["mtp_loss"] = float(stats[1]) / max(1, n_mtp)
        return record


def train_loop_per_worker(config: dict) -> dict:
    import ray
    import ray.train
    import ray.train.torch

    job = JobConfig.model_validate(config["job"])
    train_rows, val_rows, pad_id = ray.get(config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    net, _ = build_model(job, device)
    resumed = ray.train.get_checkpoint()
    if resumed is not None:                       # weights before sharding: FSDP2 shards what is loaded
        with resumed.as_directory() as d:
            read_weights(Path(d), net=net, mode=job.mode)
    objective = CausalLMObjective(net, job.mtp_loss_weight)
    ddp = wrap(objective, job.scaling.strategy, device, world)
    params = [p for p in net.parameters() if p.requires_grad]     # after wrapping: FSDP2's sharded parameters
    optimizer = torch.optim.AdamW(params, lr=job.optim.lr, betas=job.optim.betas, eps=job.optim.eps,
                                  weight_decay=job.optim.weight_decay, foreach=True)
    plan = BatchPlan(len(train_rows), job.batch.global_size, job.batch.micro_size, world, rank, job.seed)
    steps = total_steps(job, plan.steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, job.optim.warmup_steps, job.optim.min_lr_ratio))
    base = base_model(net)
    load = ExpertLoad([m for m in base.moe_layers() if m.layer < base.config.num_hidden_layers])
    trainer = StepRunner(job, ddp, params, optimizer, scheduler, plan, train_rows, pad_id, load, device, world)

    state = TrainState()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = read_progress(Path(d), net=net, optimizer=optimizer, scheduler=scheduler,
                                  sharded=is_sharded(ddp))
        state.resumed_at.append(state.step)
    bar = _progress(steps, state.step) if rank == 0 and config.get("progress_bar") else None

    while state.step < steps:
        record = trainer.run(state.step)
        state.step, state.tokens = record["step"], state.tokens + record["tokens"]
        state.train_time_s += record["step_time_s"]
        last = state.step == steps
        if len(val_rows) and (last or (job.eval_every and state.step % job.eval_every == 0)):
            record["val_loss"], val_mtp = evaluate(objective, val_rows, job.batch.micro_size, world, rank, pad_id,
                                                   device)
            if job.mtp_loss_weight > 0:
                record["val_mtp_loss"] = val_mtp
        state.history.append(record)
        if bar is not None:
            bar.set_description(f"loss {record['loss']:.4f}")
            bar.update(1)
        save = last or state.step % job.checkpoint.every_steps == 0
        if save or state.step % job.log_every == 0:
            _report(job, record, state, net, optimizer, scheduler, rank, save, last, steps, is_sharded(ddp))
    if bar is not None:
        bar.close()
    return {"steps": state.step, "tokens": state.tokens, "train_time_s": state.train_time_s, "world": world}


def _report(job: JobConfig, record: dict, state: TrainState, net, optimizer, scheduler, rank: int, save: bool,
            last: bool, steps: int, sharded: bool) -> None:
    import ray.train
    gathered = gather_state(net, optimizer, sharded) if save else None      # collective under FSDP2
    if rank == 0:
        eta = state.train_time_s / state.step * (steps - state.step)
        filled = round(20 * state.step / steps)
        print(f"[{'#' * filled}{'.' * (20 - filled)}] step {state.step}/{steps} loss {record['loss']:.4f} "
              f"lr {record['lr']:.2e} {record['tokens_per_s_per_worker']:.0f} tok/s/worker "
              f"eta {int(eta) // 60}:{int(eta) % 60:02d}"
              + (f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""), flush=True)
    if not save or rank != 0:
        ray.train.report(record)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_checkpoint(out, net=net, mode=job.mode, optimizer=optimizer, scheduler=scheduler, state=state,
                         base_model=job.model, gathered=gathered)
        if last:
            write_export(out / "export", net=base_model(net) if job.mode == "full" else net, mode=job.mode,
                         base_model=job.model, dtype=getattr(torch, job.dtype), gathered=gathered)
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step_{state.step:07d}")


def _progress(total: int, initial: int):
    """A progress bar that Ray draws on the driver's terminal (tqdm_ray), with ETA. Only for an interactive
    driver: in a log file (ray job logs) the `[####....] step ... eta` lines of `_report` are the progress."""
    try:
        from ray.experimental.tqdm_ray import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, desc="finetune")
    bar.update(initial)
    return bar
