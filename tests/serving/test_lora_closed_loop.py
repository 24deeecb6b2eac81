"""The platform's closed loop: `ray job submit` (the real CLI, to a `ray start --head` cluster of its own: see
tests/ray_helpers.py for why not the session's) a LoRA finetune job on the served tiny model that teaches four
question/answer pairs, writing its adapter under the app's lora_root; load it by name through POST /v1/load_lora_adapter; the official `openai` client asking the adapter gets
the trained answers (greedy), and the base model does not."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ray_helpers import ray_head_node

REPO = Path(__file__).resolve().parents[2]
QA = REPO / "finetune" / "configs" / "tiny-qa.jsonl"
JOB = REPO / "finetune" / "configs" / "tiny-lora.yaml"
PAIRS = 4
# One worker, the four pairs in every step, rank-8 LoRA on every target: the greedy answers are exact from 40 steps
# on (train loss 7.6 -> 0.40; 80 steps: 0.39); 60 for margin. Training itself takes ~2 s of the job's ~40 s (the
# rest is Ray Train starting its worker).
STEPS = 60


def test_finetuned_adapter_is_served_by_name(served, tiny_ckpt_fp32, lora_root, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    with ray_head_node(Path(sys.executable).parent, env) as dashboard:
        _finetune(dashboard, env, tiny_ckpt_fp32, lora_root / "qa-job", tmp_path)
    _serve_and_ask(served)


def _finetune(ray_dashboard: str, env: dict, tiny_ckpt_fp32: Path, out: Path, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(QA.read_text().splitlines()[:PAIRS]) + "\n")
    sub_id = f"raymoe-lora-loop-{os.getpid()}"
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_dashboard, "--no-wait",
           "--submission-id", sub_id, "--",
           sys.executable, "-m", "raymoe.finetune", "--config", str(JOB), "--set", f"model={tiny_ckpt_fp32}",
           "--set", f"data.train={data}", "--set", f"output_dir={out}", "--set", f"max_steps={STEPS}",
           "--set", "scaling.num_workers=1", "--set", f"batch.global_size={PAIRS}",
           "--set", f"batch.micro_size={PAIRS}", "--set", "optim.warmup_steps=3",
           "--set", f"checkpoint.every_steps={STEPS}", "--set", "log_every=10"]
    deadline = time.time() + 180
    while True:                  # a loaded machine: the node's job agent may not have registered yet
        sub = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
        if sub.returncode == 0 or "No available agent" not in sub.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    client = JobSubmissionClient(ray_dashboard)
    deadline = time.time() + 600
    status = client.get_job_status(sub_id)
    while not status.is_terminal():
        assert time.time() < deadline, "the finetune job did not finish"
        time.sleep(2)
        status = client.get_job_status(sub_id)
    logs = client.get_job_logs(sub_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS


def _serve_and_ask(served) -> None:
    pairs = [(r["messages"][0]["content"], r["messages"][1]["content"])
             for r in map(json.loads, QA.read_text().splitlines()[:PAIRS])]
    r = httpx.post(f"{served.url}/v1/load_lora_adapter", json={"lora_name": "qa", "lora_path": "qa-job"},
                   timeout=120)
    assert r.status_code == 200, r.text
    assert "qa" in {m.id for m in served.client().models.list().data}

    c = served.client(timeout=120)

    def ask(model: str, question: str) -> str:
        out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                        max_tokens=12, temperature=0)
        return out.choices[0].message.content

    assert [ask("qa", q) for q, _ in pairs] == [a for _, a in pairs]
    assert [ask(f"{served.name}:qa", q) for q, _ in pairs] == [a for _, a in pairs]
    assert not any(ask(served.name, q) == a for q, a in pairs)
