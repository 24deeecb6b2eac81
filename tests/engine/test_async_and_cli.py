"""The asyncio front (streaming, cancellation, errors, stats), incremental detokenization, and `raymoe generate`."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from raymoe.platform.config import SamplingParams
from raymoe.platform.engine import AsyncEngine, RequestError
from raymoe.platform.engine.detokenizer import IncrementalDetokenizer
from engine_helpers import greedy_reference, prompts


def test_stream_cancel_and_keep_serving(make_engine, model32):
    engine = make_engine()
    front = AsyncEngine(engine=engine)
    ps = prompts(11, (9, 14))

    async def run():
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        toks, text, last = [], "", None
        async for d in front.generate(ps[0], params, "a"):
            toks += d.token_ids
            text += d.text
            last = d
        assert toks == greedy_reference(model32, ps[0], 12)
        assert last.finish_reason == "length" and last.completion_tokens == 12 and last.prompt_tokens == 9
        assert text == engine.tokenizer.decode(toks, skip_special_tokens=True)
        # leaving the iterator early aborts the request and frees its blocks
        agen = front.generate(ps[1], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), "b")
        async for _ in agen:
            break
        await agen.aclose()
        for _ in range(200):
            if front.stats()["running"] == 0 and engine.blocks.num_free == engine.blocks.num_blocks:
                break
            await asyncio.sleep(0.02)
        assert engine.blocks.num_free == engine.blocks.num_blocks
        with pytest.raises(RequestError, match="max_model_len"):
            async for _ in front.generate(ps[0], SamplingParams(max_tokens=10 ** 6), "c"):
                pass
        # concurrent requests after all that still work
        outs = await asyncio.gather(*[collect(front, p, i) for i, p in enumerate(ps)])
        assert outs == [greedy_reference(model32, p, 5) for p in ps]
        s = front.stats()
        assert {"running", "waiting", "kv_cache_usage", "generation_tokens_per_s"} <= set(s)

    async def collect(fe, p, i):
        out = []
        async for d in fe.generate(p, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), f"g{i}"):
            out += d.token_ids
        return out
    try:
        asyncio.run(run())
    finally:
        front.shutdown()


def test_stream_hands_over_what_is_ready_in_batches(make_engine, model32):
    """`stream` yields every delta ready when its consumer looks: a consumer slower than the engine gets several
    tokens per batch, and the batches add up to the greedy answer; n=2 streams both choices."""
    front = AsyncEngine(engine=make_engine())
    p = prompts(11, (9, 14))[1]

    async def run():
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        sizes, toks = [], []
        async for batch in front.stream(p, params, "slow"):
            sizes.append(len(batch))
            toks += [t for d in batch for t in d.token_ids]
            await asyncio.sleep(0.05)          # a slow consumer: the engine keeps stepping meanwhile
        assert toks == greedy_reference(model32, p, 24)
        assert max(sizes) > 1 and len(sizes) < 24, sizes
        two = SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True)
        per_choice = {0: [], 1: []}
        async for batch in front.stream(p, two, "two"):
            for d in batch:
                per_choice[d.index] += d.token_ids
        assert per_choice[0] == per_choice[1] == greedy_reference(model32, p, 6)
    try:
        asyncio.run(run())
    finally:
        front.shutdown()



def test_incremental_detokenizer_never_splits_utf8(tiny_ckpt):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    text = "naïve café 😀👍 — 漢字 ok"
    ids = tok(text, add_special_tokens=False).input_ids
    det = IncrementalDetokenizer(tok, [0])
    pieces = [det.push([i]) for i in ids] + [det.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len(text.encode("utf-8")) // 4        # multi-byte characters really span several tokens
    assert det.backend is not None                            # the fast tokenizer's own decode, called directly
    slow = IncrementalDetokenizer(tok, [0])
    slow.backend = None                                       # through transformers' decode: the same pieces
    assert [slow.push([i]) for i in ids] + [slow.flush()] == pieces


def test_generate_cli(tiny_ckpt):
    exe = [sys.executable, "-m", "raymoe.cli", "generate", "--model", str(tiny_ckpt)]
    ok = subprocess.run(exe + ["--prompt", "Hello", "--max-tokens", "8", "--mtp", "1"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "8 tokens in" in ok.stderr and "tokens/s" in ok.stderr and ok.stderr.count("\n") == 1
    bad = subprocess.run(exe + ["--prompt", "Hello", "--temperature", "-1"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.startswith("error: invalid temperature") and "Traceback" not in bad.stderr
