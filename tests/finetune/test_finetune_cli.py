"""The command line: one-line errors before any training, and the real Ray CLI path
(`ray start --head` on loopback, `ray job submit --working-dir . -- python -m raymoe.finetune ...`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ft_helpers import CONFIGS, REPO
from ray_helpers import ray_head_node

VENV_BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    """The venv first on PATH (so the cluster's `python` has raymoe), no auth, no 30 s drain when stopping."""
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def test_bad_dataset_line_fails_in_one_line_before_training(tiny32, tmp_path):
    data = tmp_path / "chat.jsonl"
    good = json.dumps({"prompt": "2+2=", "completion": "4"})
    data.write_text(f"{good}\n{{\"prompt\": \"3+3=\", \"completion\": \n{good}\n")
    cmd = [sys.executable, "-m", "raymoe.finetune", "--config", str(CONFIGS / "tiny-lora.yaml"),
           "--set", f"model={tiny32}", "--set", f"data.train={data}", "--set", f"output_dir={tmp_path / 'out'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {data}:2: invalid JSON"), p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()

    p = subprocess.run([str(VENV_BIN / "raymoe"), "finetune", "--config", str(CONFIGS / "tiny-lora.yaml"),
                        "--set", f"model={tiny32}", "--set", "lora.targets=[attention, mlp]"],
                       capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == \
        "error: lora.targets: 'mlp' is ambiguous; use dense_mlp, shared_experts or routed_experts (PEFT 0.21 on " \
        "transformers 5 rewrites bare gate_proj/up_proj/down_proj targets to the routed experts)", p.stderr


@pytest.fixture
def ray_head():
    with ray_head_node(VENV_BIN, _env()) as address:
        yield address


def test_ray_job_submit_produces_the_adapter(ray_head, tiny32, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "adapter"
    sub = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO), "--no-wait",
         "--submission-id", "raymoe-ft-cli-test", "--",
         "python", "-m", "raymoe.finetune", "--config", "finetune/configs/tiny-lora.yaml",
         "--set", f"model={tiny32}", "--set", f"output_dir={out}", "--set", "max_steps=4",
         "--set", "checkpoint.every_steps=2", "--set", "scaling.num_workers=[1, 2]"],
        capture_output=True, text=True, cwd=REPO, env=_env(), timeout=180)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    client = JobSubmissionClient(ray_head)
    deadline = time.time() + 600           # a 2-core machine shared with other work takes minutes
    status = client.get_job_status("raymoe-ft-cli-test")
    while not status.is_terminal():
        assert time.time() < deadline, "job did not finish"
        time.sleep(2)
        status = client.get_job_status("raymoe-ft-cli-test")
    logs = client.get_job_logs("raymoe-ft-cli-test")
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["workers"] in (1, 2)        # elastic: as many as the cluster has
    assert "step 4/4" in logs                                       # the progress line reached the job's log
