"""MTP speculative decoding, measured by the engine: acceptance rate and speedup on a trained checkpoint.

    .venv/bin/python benchmarks/mtp_acceptance.py --model .cache/mtp-demo [--data .cache/mtp-demo-data/validation.jsonl]
        [--engine eager,compiled]          # CPU: eager, and cpu_compile
    python3 benchmarks/mtp_acceptance.py --device cuda --engine eager,graphs   # GPU (bf16): eager, CUDA graphs

Prompts are the first tokens of held-out validation texts; each is continued greedily for --max-tokens tokens with
num_speculative_tokens 0 (plain), 1 and 2, in the same process and run, for each engine mode (eager, and
`cpu_compile`: decode, verification and drafting steps through torch.compile). Each configuration first runs the
whole workload once untimed (compilation happens there). Greedy output must be identical with and without
speculation (checked); the acceptance rate is accepted drafts / proposed drafts over all requests.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.engine import LLMEngine
from raymoe.platform.model import from_pretrained


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=".cache/mtp-demo")
    ap.add_argument("--data", default=".cache/mtp-demo-data/validation.jsonl")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engine", default="eager,compiled",
                    help="eager, compiled (CPU: cpu_compile), graphs (CUDA: captured decode/verify/draft steps)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    model = from_pretrained(a.model, dtype=getattr(torch, dtype), device=a.device)
    base = LLMEngine(EngineConfig(model=a.model, dtype=dtype, device=a.device, enforce_eager=True), model=model)
    tok = base.tokenizer
    texts = []
    for line in Path(a.data).read_text().splitlines():
        row = json.loads(line)
        text = row.get("text") or row.get("prompt") or ""
        ids = tok(text).input_ids
        if len(ids) > a.prompt_tokens + a.max_tokens:
            texts.append(ids[:a.prompt_tokens])
        if len(texts) == a.prompts:
            break
    params = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    print(f"{len(texts)} held-out prompts of {a.prompt_tokens} tokens, {a.max_tokens} greedy tokens each, "
          f"{a.threads} thread(s), {a.device} {dtype}\n")
    print("| engine | concurrency | MTP drafts k | tokens/s | speedup vs k=0 | speedup vs eager k=0 | acceptance | "
          "tokens per main-model step | same tokens as eager k=0 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    eager_rate: dict[int, float] = {}
    ref: dict[int, list] = {}
    for mode in a.engine.split(","):
        for c in [int(x) for x in a.concurrency.split(",")]:
            ref_rate = None
            for k in (0, 1, 2):
                eng = LLMEngine(EngineConfig(model=a.model, dtype=dtype, device=a.device, num_speculative_tokens=k,
                                             cpu_compile=mode == "compiled", enforce_eager=mode == "eager"),
                                model=model)
                batches = [texts[i:i + c] for i in range(0, len(texts), c)]
                for b in batches:                                       # warm-up: the whole workload, untimed
                    eng.generate(b, params)
                t, outs = time.perf_counter(), []
                for b in batches:
                    outs += eng.generate(b, params)
                dt = time.perf_counter() - t
                if mode == "compiled" and eng.runner.compiled.failed:
                    raise SystemExit(f"cpu_compile fell back to eager: {eng.runner.compiled.failed}")
                _row(mode, c, k, outs, dt, ref, eager_rate, ref_rate)
                if k == 0:
                    ref_rate = sum(len(o["outputs"][0]["token_ids"]) for o in outs) / dt


def _row(mode: str, c: int, k: int, outs: list, dt: float, ref: dict, eager_rate: dict, ref_rate: float | None):
    toks = [o["outputs"][0]["token_ids"] for o in outs]
    n = sum(len(x) for x in toks)
    prop = sum(o["outputs"][0]["spec"][0] for o in outs) if k else 0
    acc = sum(o["outputs"][0]["spec"][1] for o in outs) if k else 0
    rate = n / dt
    if k == 0 and mode == "eager":
        ref[c], eager_rate[c] = toks, rate
    per_step = (n / (n - acc)) if k else 1.0
    print(f"| {mode} | {c} | {k} | {rate:.0f} | {rate / (ref_rate or rate):.2f}x | "
          f"{rate / eager_rate[c]:.2f}x | {f'{acc / prop:.1%}' if prop else '-'} | {per_step:.2f} | "
          f"{toks == ref[c]} |", flush=True)


if __name__ == "__main__":
    main()
