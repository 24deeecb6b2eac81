"""What a finished job leaves in output_dir, written by the driver from the final checkpoint.

  adapter_config.json + adapter_model.safetensors   (mode lora: the PEFT adapter)  or an HF checkpoint (mode full)
  metrics.jsonl    one line per optimizer step (loss, lr, grad_norm, tokens/s per worker, expert imbalance, ...)
  loss.png         the loss curve (train; validation and MTP when present)
  summary.json     steps, tokens, wall time, tokens/s per worker, first/final train loss, final validation loss
  job.yaml         the resolved job, to rerun it
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from raymoe.finetune.config import JobConfig

if TYPE_CHECKING:
    from raymoe.finetune.launcher import Prepared


def plot_loss(history: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train")
    for key, label in (("mtp_loss", "train (MTP)"), ("val_loss", "validation"), ("val_mtp_loss", "validation (MTP)")):
        pts = [(r["step"], r[key]) for r in history if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def summarize(history: list[dict], wall_time_s: float) -> dict:
    first, last = history[0], history[-1]
    workers = last.get("workers", 1)
    train_time = sum(r["step_time_s"] for r in history)
    tokens = sum(r["tokens"] for r in history)
    tail = history[-max(1, len(history) // 10):]
    summary = {
        "steps": last["step"], "tokens": tokens, "workers": workers, "wall_time_s": round(wall_time_s, 2),
        "train_time_s": round(train_time, 2),
        "tokens_per_s_per_worker": round(tokens / max(train_time, 1e-9) / workers, 1),
        "first_train_loss": first["loss"], "final_train_loss": last["loss"],
        "final_train_loss_mean_last_10pct": sum(r["loss"] for r in tail) / len(tail),
    }
    for key in ("val_loss", "mtp_loss", "val_mtp_loss"):
        vals = [r[key] for r in history if key in r]
        if vals:
            summary[f"final_{key}"] = vals[-1]
    return summary


def write_outputs(job: JobConfig, checkpoint: Path, prepared: "Prepared", wall_time_s: float) -> dict:
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    export = checkpoint / "export"
    if not export.is_dir():
        raise FileNotFoundError(f"{checkpoint}: the final checkpoint has no export/ directory")
    for f in export.iterdir():
        shutil.copy2(f, out / f.name)
    state = json.loads((checkpoint / "state.json").read_text())
    history = state["history"]
    with (out / "metrics.jsonl").open("w") as f:
        for r in history:
            f.write(json.dumps(r) + "\n")
    plot_loss(history, out / "loss.png")
    summary = {"mode": job.mode, "output_dir": str(out), **summarize(history, wall_time_s),
               "resumed_at_steps": state["resumed_at"],
               "data": {"train": asdict(prepared.train_stats), "validation": asdict(prepared.validation_stats)}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "job.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    return summary
