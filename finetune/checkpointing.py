"""Training checkpoints: what a worker hands to `ray.train.report` and reads back to resume exactly.

A checkpoint directory holds
  adapter/            the PEFT adapter so far (mode lora)   | model.safetensors  every tensor (mode full)
  optimizer.pt        AdamW state                           | scheduler.pt       LR schedule state
  state.json          step (the data position, see finetune.batches), tokens, train time, per-step metrics
and, in the final one, export/: the deliverable (the adapter, or an HF checkpoint with the tokenizer) that the
driver copies to output_dir. Everything is fp32-exact, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raymoe.finetune.lora import load_adapter_weights, save_adapter
from raymoe.finetune.sharding import GatheredState, load_optimizer_state

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done = the data position
    tokens: int = 0               # tokens trained on, all workers
    train_time_s: float = 0.0     # time inside training steps (no startup, eval or checkpoint I/O)
    resumed_at: list[int] = field(default_factory=list)   # steps at which a restarted worker group resumed
    history: list[dict] = field(default_factory=list)


def write_checkpoint(out: Path, *, net: nn.Module, mode: str, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainState, base_model: str,
                     gathered: GatheredState | None = None) -> None:
    """`gathered`: the full state FSDP2 collected on this rank (sharded training); else read from the objects."""
    if mode == "lora":
        save_adapter(net, out / "adapter", base_model, state_dict=gathered.model if gathered else None)
    else:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                  str(out / "model.safetensors"))
    torch.save(gathered.optimizer if gathered else optimizer.state_dict(), out / "optimizer.pt")
    torch.save(scheduler.state_dict(), out / "scheduler.pt")
    (out / "state.json").write_text(json.dumps(asdict(state)))


def read_weights(src: Path, *, net: nn.Module, mode: str) -> None:
    """The trained weights (before the model is wrapped for data parallelism)."""
    if mode == "lora":
        load_adapter_weights(net, src / "adapter")
    else:
        net.load_state_dict(load_file(str(src / "model.safetensors")), strict=True)


def read_progress(src: Path, *, net: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, sharded: bool = False) -> TrainState:
    """Optimizer, schedule and data position (after the model is wrapped and the optimizer built)."""
    load_optimizer_state(net, optimizer, torch.load(src / "optimizer.pt", weights_only=True), sharded)
    scheduler.load_state_dict(torch.load(src / "scheduler.pt", weights_only=True))
    return TrainState(**json.loads((src / "state.json").read_text()))


def write_export(out: Path, *, net: nn.Module, mode: str, base_model: str, dtype: torch.dtype,
                 gathered: GatheredState | None = None) -> None:
    """The job's product: the PEFT adapter, or (mode full) an HF checkpoint with the base's tokenizer files."""
    if mode == "lora":
        save_adapter(net, out, base_model, state_dict=gathered.model if gathered else None)
        return
    from raymoe.platform.checkpoint import save_checkpoint
    save_checkpoint(net, out, dtype=dtype)
    for name in TOKENIZER_FILES:
        if (Path(base_model) / name).is_file():
            shutil.copy2(Path(base_model) / name, out / name)
