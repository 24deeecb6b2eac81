"""An app whose model replicas put their routed experts on 2 shards (Ray actors in the replica's placement group)
answers over HTTP exactly as the single-process app does."""
from __future__ import annotations

import pytest

from serve_helpers import app_args, deploy


@pytest.fixture(scope="module")
def sharded(serve_http, tiny_ckpt_fp32):
    from ray import serve
    app = deploy(serve_http, "ep2", "/ep2", app_args(
        tiny_ckpt_fp32, ep=2, num_cpus=0.25, engine={"num_blocks": 256, "block_size": 16, "max_num_seqs": 16,
                                                     "parallel": {"cpus_per_shard": 0.25}}))
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
