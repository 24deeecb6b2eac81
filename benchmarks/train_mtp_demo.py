"""Train a small DeepSeek-V3 (about 8M parameters, MTP module included) on the Python standard library's source
with `mode: full` and the MTP loss on, and save it as an HF checkpoint for MTP speculative-decoding measurements.

Reproducible: the base weights come from write_tiny_checkpoint(seed), the corpus is the stdlib's *.py files
(test suites and site-packages left out) in sorted order, capped at --max-chars, with every 20th file (by name
hash) held out for validation; the job (finetune/configs/tiny-lora.yaml overridden below) fixes seed, steps and
batch. Runs as one Ray Train job with 2 CPU workers; about 15-20 minutes on 2 cores. Writes
  <out>          the trained HF checkpoint (+ tokenizer, metrics.jsonl, loss.png, summary.json, job.yaml)
  <out>-data/    train.jsonl, validation.jsonl         <out>-base/  the random initial checkpoint
and prints validation losses plus a teacher-forced MTP agreement rate (how often the MTP head's argmax for token
t+2 equals the main head's argmax at t+1 on validation text: a proxy, not the engine's acceptance rate).

    python benchmarks/train_mtp_demo.py [--out .cache/mtp-demo] [--max-steps 450]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
             num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
             qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4,
             n_group=4, topk_group=2, n_shared_experts=1, num_nextn_predict_layers=1)


def stdlib_corpus(out: Path, max_chars: int) -> tuple[Path, Path, dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    out.mkdir(parents=True, exist_ok=True)
    train, val = out / "train.jsonl", out / "validation.jsonl"
    stats = {"root": str(root), "files": 0, "train_chars": 0, "validation_chars": 0}
    total = 0
    with train.open("w") as ft, val.open("w") as fv:
        for p in files:
            text = p.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                continue
            if total + len(text) > max_chars:
                break
            total += len(text)
            rel = str(p.relative_to(root))
            held = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 20 == 0
            (fv if held else ft).write(json.dumps({"text": text}) + "\n")
            stats["files"] += 1
            stats["validation_chars" if held else "train_chars"] += len(text)
    return train, val, stats


@torch.no_grad()
def evaluate_demo(model_dir: Path, val_jsonl: Path, seq_len: int, rows: int = 16) -> dict:
    """Parameter counts, and the teacher-forced MTP agreement: the share of positions i where argmax MTP(i)
    (token i+2) equals argmax main(i+1)."""
    from transformers import AutoTokenizer

    from raymoe.platform.model import from_pretrained
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = from_pretrained(model_dir, dtype=torch.float32)
    ids = []
    for line in val_jsonl.read_text().splitlines():
        ids.extend(tok(json.loads(line)["text"])["input_ids"])
        if len(ids) >= rows * seq_len:
            break
    x = torch.tensor(ids[:rows * seq_len]).view(rows, seq_len)
    hidden = model.hidden_states(x)
    main = model.lm_head(hidden).argmax(-1)                               # [R, T] predicts x[:, 1:]
    mtp = model.mtp_logits(hidden[:, :-1], x[:, 1:]).argmax(-1)           # [R, T-1] predicts x[:, 2:]
    return {"params": sum(p.numel() for p in model.parameters()),
            "mtp_params": sum(p.numel() for p in model.mtp.parameters()),
            "mtp_teacher_forced_agreement": float((mtp[:, :-1] == main[:, 1:-1]).float().mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "mtp-demo")
    ap.add_argument("--max-chars", type=int, default=4_000_000)
    ap.add_argument("--max-steps", type=int, default=450)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = args.out.resolve()

    from raymoe.finetune.config import load_job
    from raymoe.finetune.launcher import run
    from raymoe.platform.checkpoint import TinySpec, write_tiny_checkpoint

    train, val, corpus = stdlib_corpus(Path(f"{out}-data"), args.max_chars)
    base = write_tiny_checkpoint(Path(f"{out}-base"), TinySpec(seed=args.seed, dtype="float32", overrides=MODEL))
    job = load_job(REPO / "finetune/configs/tiny-lora.yaml", [
        "name=mtp-demo", f"model={base}", f"output_dir={out}", "mode=full", f"seed={args.seed}",
        f"data.train={train}", f"data.validation={val}", "data.packing=true", f"data.max_seq_len={args.seq_len}",
        "mtp_loss_weight=0.3", "update_expert_bias=true", "expert_bias_rate=0.001",
        "optim.lr=0.003", "optim.warmup_steps=50", "optim.min_lr_ratio=0.1", "optim.weight_decay=0.01",
        "batch.global_size=16", "batch.micro_size=8", f"max_steps={args.max_steps}", "epochs=100",
        f"scaling.num_workers={args.workers}", "log_every=50", "eval_every=300", "checkpoint.every_steps=300",
        f"checkpoint.storage_path={out}-run"])
    summary = run(job)
    report = {"checkpoint": str(out), "corpus": corpus, "summary": summary,
              **evaluate_demo(out, val, args.seq_len)}
    (out / "mtp_demo_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
