"""The Router actor on a real local Ray cluster: live re-planning while a request streams, and shard faults."""
from __future__ import annotations

import threading
import time

import pytest

from ep_helpers import engine_config
from raymoe.platform.config import SamplingParams
from raymoe.platform.engine import LLMEngine
from raymoe.platform.parallel.plan import PlacementPlan
from raymoe.platform.parallel.router import start_router


def _reference(ref_model, tiny_ckpt_fp32, prompt, n):
    eng = LLMEngine(engine_config(tiny_ckpt_fp32, num_blocks=400), model=ref_model)
    return eng.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]["outputs"][0]


class Stream:
    """Consume a Router stream in a thread: tokens as they come, the error if it ends in one."""

    def __init__(self, ray, router, prompt, n):
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True).model_dump()
        self.gen = router.generate.options(num_returns="streaming").remote(prompt, params)
        self.thread = threading.Thread(target=self._run, args=(ray,), daemon=True)
        self.thread.start()

    def _run(self, ray):
        try:
            for ref in self.gen:
                self.tokens += ray.get(ref)["token_ids"]
        except Exception as e:                      # noqa: BLE001 - the test inspects it
            self.error = e
        finally:
            self.done.set()

    def wait_for(self, n: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while len(self.tokens) < n and not self.done.is_set() and time.monotonic() < end:
            time.sleep(0.01)


@pytest.mark.parametrize("transport", ["ray", "collective"])
def test_replan_2_4_3_while_streaming(ray_cluster, tiny_ckpt_fp32, ref_model, ep_prompts, transport):
    ray = ray_cluster
    n = 1000
    ref = _reference(ref_model, tiny_ckpt_fp32, ep_prompts[1], n)["token_ids"]
    cfg = engine_config(tiny_ckpt_fp32, 2, transport, num_blocks=400)
    router = start_router(cfg)
    try:
        layers = ray.get(router.plan.remote())["layers"]
        stream = Stream(ray, router, ep_prompts[1], n)
        stream.wait_for(5)
        at = []
        for shards in (4, 3):
            plan = PlacementPlan.contiguous(shards, layers, 16)
            assert ray.get(router.apply_plan.remote(plan.model_dump())) == shards
            at.append(len(stream.tokens))
            assert len(ray.get(router.shard_actors.remote())) == shards
        stream.done.wait(120)
        assert stream.error is None
        assert all(0 < a < n for a in at), at          # both plans were swapped in while the request streamed
        assert stream.tokens == ref
    finally:
        ray.get(router.shutdown.remote())
        ray.kill(router)


@pytest.mark.parametrize("transport", ["ray", "collective"])
def test_killed_shard_restarts_and_requests_go_on(ray_cluster, tiny_ckpt_fp32, ref_model, ep_prompts, transport):
    ray = ray_cluster
    n = 300
    ref = _reference(ref_model, tiny_ckpt_fp32, ep_prompts[2], n)["token_ids"]
    deadline = 30.0
    router = start_router(engine_config(tiny_ckpt_fp32, 2, transport, step_deadline_s=deadline))
    try:
        stream = Stream(ray, router, ep_prompts[2], n)
        stream.wait_for(10)
        shard = ray.get(router.shard_actors.remote())[1]
        killed = time.monotonic()
        ray.kill(shard, no_restart=False)           # Ray restarts it; it reloads its experts
        assert stream.done.wait(deadline + 30), "the request hung"
        if stream.error is None:
            assert stream.tokens == ref                                  # the step was retried
        else:                                                            # or the documented error, in time
            assert "expert shard" in str(stream.error) and time.monotonic() - killed < deadline + 10
        again = Stream(ray, router, ep_prompts[2], 24)                  # the router lives on
        assert again.done.wait(deadline + 30) and again.error is None
        assert again.tokens == ref[:24]
    finally:
        ray.get(router.shutdown.remote())
        ray.kill(router)
