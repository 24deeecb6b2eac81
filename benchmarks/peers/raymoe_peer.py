"""raymoe's side of the CPU decode benchmark: one engine configuration in its own process, answering the driver's
requests (interleave.py's protocol). Run by benchmarks/cpu_decode.py:

    .venv/bin/python benchmarks/peers/raymoe_peer.py --model DIR --prompts FILE --dtype bfloat16 --compile \
        --threads 1

`LLMEngine(EngineConfig(dtype, cpu_compile, cpu_threads))`, `generate(batch, SamplingParams(temperature=0,
max_tokens=n, ignore_eos=True))`: the whole batch is submitted at once and the engine's continuous batching runs
it. With --compile the decode step goes through torch.compile (freezing: bf16 linears become oneDNN-packed GEMMs);
its compilation happens in the driver's untimed warm-up, as every peer's start-up does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import answer_channel, serve  # noqa: E402
from prompts import load_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description="raymoe engine for the CPU decode benchmark")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--compile", action="store_true", help="EngineConfig.cpu_compile")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    fd = answer_channel()

    from raymoe.platform.config import EngineConfig, SamplingParams
    from raymoe.platform.engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=a.model, dtype=a.dtype, cpu_threads=a.threads, max_num_seqs=64,
                                 kv_cache_memory_gb=1.0, cpu_compile=a.compile))

    def generate(batch: list[list[int]], n: int) -> list[list[int]]:
        res = eng.generate(batch, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        if a.compile and eng.runner.compiled.failed:
            raise RuntimeError(f"cpu_compile fell back to eager: {eng.runner.compiled.failed}")
        return [r["outputs"][0]["token_ids"] for r in res]

    serve(generate, load_prompts(a.prompts), fd)


if __name__ == "__main__":
    main()
