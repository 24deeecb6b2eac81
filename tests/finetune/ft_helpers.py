"""Helpers shared by the finetuning tests (a plain module: test files import it by name)."""
from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "finetune" / "configs"
QA = CONFIGS / "tiny-qa.jsonl"


def greedy(model, tok, question: str, max_new: int = 12) -> str:
    """Greedy answer of a raymoe model to one chat question (full recompute each token: tiny models only)."""
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out)


def randomize_lora(model, seed: int = 0, std: float = 0.2) -> None:
    """Give every LoRA factor random values (a fresh adapter has B = 0 and changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def assert_adapter_toggles(pm, base_ckpt, ids) -> None:
    """With the adapter disabled the PEFT-wrapped raymoe model gives the base model's logits; enabled, it differs."""
    from raymoe.platform.model import from_pretrained
    with torch.no_grad():
        base = from_pretrained(base_ckpt, dtype=torch.float32)(ids)
        with pm.disable_adapter():
            assert (pm.get_base_model()(ids) - base).abs().max() < 1e-5
        assert (pm.get_base_model()(ids) - base).abs().max() > 1e-2


def train_worker_pids() -> set[int]:
    """Pids of the live Ray Train worker actors of the session's cluster, from the GCS actor table (the public
    `ray.util.state.list_actors` goes through the dashboard, which the test cluster does not start)."""
    from ray._private.state import actors
    return {a["Pid"] for a in actors().values()
            if a["ActorClassName"].endswith("RayTrainWorker") and a["State"] == "ALIVE"}


@contextlib.contextmanager
def kill_a_worker_after_first_commit(job) -> Iterator[list[int]]:
    """While the body runs `job`: once Ray Train's controller has committed the job's first checkpoint, wait a
    random 0-0.5 s and SIGKILL one of the job's train worker processes, chosen at random, from outside (wherever
    training then is). Yields the list that receives the killed pid (empty if no worker was alive to kill)."""
    snapshot = Path(job.storage_path) / job.name / "checkpoint_manager_snapshot.json"   # Ray Train's commit log
    before, killed = train_worker_pids(), []

    def kill_one() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (snapshot.is_file() and "checkpoint_step_" in snapshot.read_text()):
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.5))
        pids = sorted(train_worker_pids() - before)
        if pids:
            killed.append(random.choice(pids))
            os.kill(killed[-1], signal.SIGKILL)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    try:
        yield killed
    finally:
        killer.join()
