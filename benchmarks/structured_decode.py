"""Structured-output decode benchmark: decode tokens/s with a JSON schema against unconstrained, same engine, same
prompts, concurrency 1 and 16; and time to first token with a cold schema (compiled at admission) against a cached
one, through the async engine.

    .venv/bin/python benchmarks/structured_decode.py [--device cpu] [--max-tokens 96] [--threads 4]
    python benchmarks/structured_decode.py --device cuda --layers 4    # full-width layers as gpu_decode.py builds

CPU: the tiny checkpoint (random weights, the tiny tokenizer). CUDA: a full-width DeepSeek-V3 stack of a few layers
(gpu_decode.build: hidden 7168, 256 experts, vocab 129,280) with the tiny tokenizer attached, so the bitmask spans
the full vocabulary (4,040 words a row) while xgrammar's per-token tables are the tiny tokenizer's (a real
128k-token tokenizer makes each fill dearer; the bitmask apply is the same). Throughput is generated tokens over the
wall time of the batch after prefill; constrained outputs end where their JSON ends, so each run reports its own
token count. The schema asks for a fixed number of records, so outputs are long and every step is constrained.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

import torch


def schema(records: int, name_len: int = 6) -> dict:
    rec = {"type": "object", "additionalProperties": False, "required": ["id", "name", "ok"],
           "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                          "name": {"type": "string", "maxLength": name_len}, "ok": {"type": "boolean"}}}
    return {"type": "object", "additionalProperties": False, "required": ["records"],
            "properties": {"records": {"type": "array", "items": rec, "minItems": records, "maxItems": records}}}


def make_engine(args):
    from raymoe.platform.config import EngineConfig
    from raymoe.platform.engine import LLMEngine
    if args.device == "cpu":
        from raymoe.platform.checkpoint import TinySpec
        from raymoe.platform.checkpoint.tiny import write_tiny_checkpoint
        path = write_tiny_checkpoint(tempfile.mkdtemp(), TinySpec(dtype="float32"))
        return LLMEngine(EngineConfig(model=str(path), dtype="float32", cpu_threads=args.threads, max_num_seqs=64,
                                      num_blocks=4096, block_size=16))
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    from raymoe.platform.checkpoint.tokenizer import write_tokenizer
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_decode
    gpu_decode.DEV = "cuda"
    hf, ours, cfg = gpu_decode.build(args.layers)
    del hf
    tok_dir = tempfile.mkdtemp()
    write_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    return LLMEngine(EngineConfig(model="bench", device="cuda", dtype="bfloat16", block_size=64, num_blocks=512,
                                  max_model_len=4096, cuda_graph_sizes=[1, 16]), model=ours, tokenizer=tok)


def decode_rate(eng, prompts, params) -> tuple[float, int]:
    """Generated tokens per second after every prompt's prefill (prefill steps excluded), and the token count."""
    for i, p in enumerate(prompts):
        eng.add_request(f"r{time.monotonic_ns()}-{i}", p, params)
    while any(s.num_uncomputed > 1 for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    sync = torch.cuda.synchronize if str(eng.cfg.device).startswith("cuda") else (lambda: None)
    sync()
    t, n = time.perf_counter(), 0
    while eng.has_unfinished():
        n += sum(len(d.token_ids) for d in eng.step())
    sync()
    return n / (time.perf_counter() - t), n


async def first_token_s(aeng, prompt, params) -> float:
    t = time.perf_counter()
    async for d in aeng.generate(prompt, params):
        if d.token_ids:
            dt = time.perf_counter() - t
            break
    return dt


async def ttft(eng, prompt, max_tokens: int, n: int) -> tuple[float, float, float]:
    """Median TTFT (s): a schema never seen (compiled at admission), the same schema again (cached), and free."""
    from raymoe.platform.config import GrammarSpec, SamplingParams
    from raymoe.platform.engine import AsyncEngine
    aeng = AsyncEngine(engine=eng)
    cold, warm, free = [], [], []
    for i in range(n):
        spec = GrammarSpec(kind="json_schema", value=json.dumps(schema(4 + i, 6 + i)))   # new text: a new compile
        p = SamplingParams(temperature=0, max_tokens=max_tokens, grammar=spec)
        cold.append(await first_token_s(aeng, prompt, p))
        warm.append(await first_token_s(aeng, prompt, p))
        free.append(await first_token_s(aeng, prompt, SamplingParams(temperature=0, max_tokens=max_tokens)))
    aeng._stop = True
    aeng._wake.set()
    aeng._thread.join(timeout=10)
    return statistics.median(cold), statistics.median(warm), statistics.median(free)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    args = ap.parse_args()
    from raymoe.platform.config import GrammarSpec, SamplingParams
    eng = make_engine(args)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 700, (args.prompt,), generator=g).tolist() for _ in range(64)]
    spec = GrammarSpec(kind="json_schema", value=json.dumps(schema(8)))
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    cons = SamplingParams(temperature=0, max_tokens=args.max_tokens, grammar=spec)
    eng.compile_grammar(spec)                                   # compile cost is the TTFT table's, not this one's
    decode_rate(eng, prompts[:2], free)                         # warm-up (graphs, allocator)
    decode_rate(eng, prompts[:2], cons)
    print(f"# structured_decode: device {args.device}, max_tokens {args.max_tokens}, prompt {args.prompt} tokens, "
          f"threads {torch.get_num_threads()}")
    print("| concurrency | unconstrained tok/s | JSON schema tok/s | ratio | tokens (free / schema) |")
    print("|---|---|---|---|---|")
    for c in [int(x) for x in args.concurrency.split(",")]:
        f_runs, c_runs = [], []
        for _ in range(args.repeats):                           # interleaved, so drift hits both alike
            f_runs.append(decode_rate(eng, prompts[:c], free))
            c_runs.append(decode_rate(eng, prompts[:c], cons))
        f = statistics.median(r for r, _ in f_runs)
        s = statistics.median(r for r, _ in c_runs)
        print(f"| {c} | {f:.1f} | {s:.1f} | {s / f:.3f} | {f_runs[0][1]} / {c_runs[0][1]} |")
    cold, warm, free_t = asyncio.run(ttft(eng, prompts[0], 8, 5))
    print(f"\nTTFT (median of 5, ms): cold schema (compile at admission) {cold * 1e3:.1f}, cached schema "
          f"{warm * 1e3:.1f}, unconstrained {free_t * 1e3:.1f}")


if __name__ == "__main__":
    main()
