"""EngineProcess: the engine in a child process behind the same asyncio front as AsyncEngine. Concurrent greedy
streams, refusals, aborts that free the child's KV blocks, constrained requests, adapters loaded by name, and a
child that dies mid-stream, all against the in-process greedy reference."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from raymoe.platform.config import EngineConfig, GrammarSpec, SamplingParams
from raymoe.platform.engine import AdapterInvalid, AdapterNotFound, EngineProcess, RequestError
from engine_helpers import greedy_reference, prompts
from lora_helpers import make_adapter, merged_model


DEVICE = os.environ.get("RAYMOE_TEST_DEVICE", "cpu")


def _start(ckpt) -> EngineProcess:
    return EngineProcess(EngineConfig(model=str(ckpt), device=DEVICE, num_blocks=512, block_size=4, cpu_threads=1))


@pytest.fixture(scope="module")
def proc(tiny_ckpt_fp32):
    ep = _start(tiny_ckpt_fp32)
    yield ep
    ep.shutdown()


async def _collect(front, p: list[int], params: SamplingParams) -> list[int]:
    out = []
    async for d in front.generate(p, params):
        out += d.token_ids
    return out


async def _until(pred, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out waiting")


def test_streams_refusals_aborts_and_grammars(proc, model32):
    ps = prompts(11, (9, 14))
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def run():
        outs = await asyncio.gather(*[_collect(proc, p, greedy) for p in ps])
        assert outs == [greedy_reference(model32, p, 10) for p in ps]
        with pytest.raises(RequestError, match="max_model_len"):
            await _collect(proc, ps[0], SamplingParams(max_tokens=10 ** 6))
        with pytest.raises(RequestError, match="outside the vocabulary"):
            await _collect(proc, [10 ** 7], greedy)
        # leaving a stream early aborts the request in the child: its blocks come back
        agen = proc.generate(ps[1], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        async for _ in agen:
            break
        await agen.aclose()
        await _until(lambda: proc.stats()["running"] == 0 and proc.stats()["kv_cache_usage"] == 0)
        assert proc.open_requests == 0
        # a constrained request: compiled in the child at admission, then only its choices come out
        choices = ["yes", "no", "maybe"]
        spec = GrammarSpec(kind="choice", value=json.dumps(choices))
        texts = []
        for p in ps[:3]:
            text = ""
            async for d in proc.generate(p, SamplingParams(temperature=0, max_tokens=20, grammar=spec)):
                text += d.text
            texts.append(text)
        assert all(t in choices for t in texts), texts
        with pytest.raises(RequestError):
            await _collect(proc, ps[0], SamplingParams(max_tokens=5, grammar=GrammarSpec(kind="regex", value="(")))

    asyncio.run(run())


def test_adapters_by_name(proc, tiny_ckpt_fp32, tmp_path):
    ad = make_adapter(tiny_ckpt_fp32, tmp_path / "a1", targets=["all"], rank=4, seed=3)
    p = prompts(12, (10, 11))[0]
    want = greedy_reference(merged_model(tiny_ckpt_fp32, ad), p, 8)

    async def run():
        info = await proc.load_adapter("a1", str(ad))
        assert info["name"] == "a1" and info["rank"] == 4
        assert await proc.adapters() == ["a1"]
        got = await _collect(proc, p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, adapter="a1"))
        assert got == want
        with pytest.raises(AdapterNotFound):
            await _collect(proc, p, SamplingParams(max_tokens=4, adapter="nope"))
        with pytest.raises(AdapterInvalid):
            await proc.load_adapter("broken", str(tmp_path / "missing"))
        await proc.unload_adapter("a1")
        assert await proc.adapters() == []
        with pytest.raises(AdapterNotFound):
            await proc.unload_adapter("a1")

    asyncio.run(run())


def test_a_dying_child_ends_its_streams(tiny_ckpt_fp32):
    """SIGKILL the child mid-stream: the stream ends with a clear error (no hang), the front says it is not alive,
    and new requests and calls are refused at once."""
    ep = _start(tiny_ckpt_fp32)
    p = prompts(13, (9, 10))[0]

    async def run():
        agen = ep.generate(p, SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True))
        await agen.__anext__()
        os.kill(ep.facts["pid"], signal.SIGKILL)
        with pytest.raises(RuntimeError, match="engine process exited"):
            async with asyncio.timeout(30):
                async for _ in agen:
                    pass
        assert not ep.alive
        with pytest.raises(RuntimeError, match="engine process exited"):
            await _collect(ep, p, SamplingParams(max_tokens=2))
        with pytest.raises(RuntimeError, match="engine process exited"):
            await ep.adapters()

    try:
        asyncio.run(run())
    finally:
        ep.shutdown()
