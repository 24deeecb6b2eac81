"""An app whose model replicas put their routed experts on 2 shards (Ray actors in the replica's placement group)
answers over HTTP exactly as the single-process app does, LoRA adapters served by name included (the session's
adapter root: the main app serves the same adapters in one process)."""
from __future__ import annotations

import time

import httpx
import pytest

from serve_helpers import LORA_MAX_RANK, app_args, deploy, engine_process, make_adapter


@pytest.fixture(scope="module")
def sharded(serve_http, tiny_ckpt_fp32, lora_root):
    from ray import serve
    app = deploy(serve_http, "ep2", "/ep2", app_args(
        tiny_ckpt_fp32, ep=2, num_cpus=0.25, lora_root=str(lora_root), max_loras=2, max_lora_rank=LORA_MAX_RANK,
        engine={"num_blocks": 256, "block_size": 16, "max_num_seqs": 16, "parallel": {"cpus_per_shard": 0.25}}))
    yield app
    serve.delete(app.app)


def test_same_greedy_answer_with_two_expert_shards(served, sharded):
    msgs = [{"role": "user", "content": "Tell me about expert parallelism."}]
    answers = [s.client().chat.completions.create(model=s.name, messages=msgs, max_tokens=24, temperature=0,
                                                  extra_body={"ignore_eos": True})
               for s in (served, sharded)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[1].usage.completion_tokens == 24
    text = sharded.client().completions.create(model=sharded.name, prompt=[5, 6, 7, 8], max_tokens=16,
                                               temperature=0)
    base = served.client().completions.create(model=served.name, prompt=[5, 6, 7, 8], max_tokens=16, temperature=0)
    assert text.choices[0].text == base.choices[0].text


@pytest.fixture(scope="module")
def ep_adapters(lora_root, tiny_ckpt_fp32) -> list[str]:
    """Two adapters under the session's adapter root, both on routed experts (one on nothing else)."""
    make_adapter(tiny_ckpt_fp32, lora_root / "ep-experts", ["routed_experts"], seed=21)
    make_adapter(tiny_ckpt_fp32, lora_root / "ep-all", ["all"], seed=22)
    return ["ep-experts", "ep-all"]


def test_adapters_by_name_over_two_expert_shards(served, sharded, ep_adapters):
    """`model="<adapter>"` through the official client: the sharded app's greedy answer is the single-process
    app's for every adapter and the base, and the adapters change it (the expert-only one too)."""
    msgs = [{"role": "user", "content": "Tell me about adapters."}]
    answers = {}
    for model in [*ep_adapters, None]:
        for s in (served, sharded):
            out = s.client(timeout=120).chat.completions.create(
                model=model or s.name, messages=msgs, max_tokens=16, temperature=0,
                extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 16
            answers[model, s.app] = out.choices[0].message.content
        assert answers[model, sharded.app] == answers[model, served.app], model
    assert len({answers[m, sharded.app] for m in [*ep_adapters, None]}) == 3
    assert {*ep_adapters, sharded.name} <= {m.id for m in sharded.client().models.list().data}



def test_shards_belong_to_the_engine_process_and_go_with_it(sharded):
    """engine_core auto: the replica steps its engine in a child process, which joins the cluster as a driver of its
    own and starts the shards in the replica's placement group. When that process dies its shards die with it
    (Ray's owner fate-sharing), and Serve replaces the replica, shards and all: the one new placement group is the
    new replica's (the new engine process made none of its own)."""
    import psutil
    import ray
    from ray._private.state import actors

    def shards() -> list[dict]:
        return [a for a in actors().values() if a["ActorClassName"] == "ExpertShard" and a["State"] == "ALIVE"]
    replica_job = {a["JobID"] for a in actors().values() if a["ActorClassName"] == "ServeReplica:ep2:ModelServer"}
    before = shards()
    assert len(before) == 2 and not {a["JobID"] for a in before} & replica_job, (before, replica_job)
    def groups() -> dict[str, str]:
        return {i: g["name"] for i, g in ray.util.placement_group_table().items() if g["state"] == "CREATED"}
    groups_before = groups()
    child = engine_process("ep2")
    child.kill()
    deadline = time.time() + 60
    while time.time() < deadline and any(psutil.pid_exists(a["Pid"]) for a in before):
        time.sleep(0.5)
    assert not any(psutil.pid_exists(a["Pid"]) for a in before), "the shards outlived their engine process"
    deadline = time.time() + 120                # Serve replaces the replica; its new engine process starts shards
    while time.time() < deadline:
        r = httpx.post(f"{sharded.url}/v1/completions", timeout=60,
                       json={"model": sharded.name, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0})
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert len(shards()) == 2 and engine_process("ep2").pid != child.pid
    new = {i: n for i, n in groups().items() if i not in groups_before}
    assert list(new.values()) and all(n.startswith("SERVE_REPLICA::ep2#ModelServer#") for n in new.values()), new
