"""Hugging Face transformers peer of the CPU decode benchmark. Run it with the project venv:

    .venv/bin/python benchmarks/peers/hf_peer.py --model /tmp/vllm-tiny \
        --prompts /tmp/prompts.json --max-tokens 64 --concurrency 1,8,32

`AutoModelForCausalLM.from_pretrained(dir, dtype=--dtype)` (transformers' own DeepseekV3 code, its default
experts implementation), `generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`, so every request
makes exactly N tokens. torch's default intra-op thread count (all cores) unless --threads N; recorded in
"config".

--cache dynamic (default): eager forward, DynamicCache. --cache static: `cache_implementation="static"` with
transformers' own automatic compilation of the decode forward (`CompileConfig`, Inductor; transformers applies it
only on GPUs unless the config's `_compile_all_devices` is set, which this script sets for the CPU), the
configuration transformers documents for fast decoding.

--serve: load, then answer the CPU decode driver's requests (interleave.py) with one batched generate per
request (left-padded, as "batch" below) instead of running the modes below.

Two modes per concurrency c (the first c prompts of prompts.py's file):
  sequential  the c prompts one after another, batch size 1 each (no padding). Every prompt is generated
              once; the row for c sums the first c prompts' times, so c=1 is plain single-stream decode and
              c=32 is "sequential throughput at 32".
  batch       one generate call on the c prompts left-padded to the longest (pad id from the tokenizer,
              attention mask set; transformers derives position ids from the mask).

Numbers (time.perf_counter around generate; median of --repeats timed runs after an untimed warm-up):
  tokens             generated tokens (c * N)
  seconds            wall time
  tokens_per_s       tokens / seconds -- the headline "decode tokens/s" (prefill included), as in vllm_peer.py
  prefill_seconds    the same run with max_new_tokens=1 (prefill + first token)
  decode_tokens_per_s  (tokens - c) / (seconds - prefill_seconds): TTFT taken out

The last line of stdout is one JSON object:
  {"peer": "hf", "results": [{"concurrency": c, "mode": "sequential"|"batch", "tokens": ..., "seconds": ...,
   "tokens_per_s": ..., "prefill_seconds": ..., "decode_tokens_per_s": ...}, ...],
   "greedy_tokens": [[...], ...]}   (from the sequential, unpadded runs, prompt order)
plus "batch_consistent" (padded-batch greedy tokens equal the sequential ones, per c) and "config".

EOS: by default (--eos mask) min_new_tokens=N sets EOS's logit to -inf for all N steps, whereas vLLM's
ignore_eos only keeps going past an EOS. So where a greedy argmax is EOS, HF and vLLM tokens diverge from
there (seen: 2 of the 32 seed-0 prompts at 64 tokens). --eos ignore takes EOS out of the generation config
instead (no min_new_tokens; generate still makes exactly N tokens), which gives vLLM's ignore_eos semantics.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import answer_channel, serve  # noqa: E402
from prompts import load_prompts, parse_concurrency, take  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description="HF transformers peer of the decode benchmark")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=parse_concurrency, default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", default="sequential,batch")
    ap.add_argument("--no-prefill-split", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                    help="static: StaticCache + transformers' automatic torch.compile of the decode step")
    ap.add_argument("--serve", action="store_true", help="answer the driver's requests (interleave.py)")
    ap.add_argument("--eos", choices=["mask", "ignore"], default="mask",
                    help="mask: min_new_tokens=N (EOS can never be generated); ignore: no EOS at all in the "
                         "generation config, so an argmax EOS is emitted and decoding goes on (= vLLM's ignore_eos)")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]

    fd = answer_channel() if a.serve else None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig, GenerationConfig

    if a.threads:
        torch.set_num_threads(a.threads)
    prompts = load_prompts(a.prompts)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).eval()
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(a.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else model.config.eos_token_id
    eos_id = model.config.eos_token_id

    if a.eos == "ignore":
        # generate() fills unset fields from model.generation_config, so EOS is removed there too
        model.generation_config.eos_token_id = None

    cache: dict = {}
    if a.cache == "static":
        compile_config = CompileConfig()          # transformers' defaults (Inductor, its default mode)
        compile_config._compile_all_devices = True
        cache = {"cache_implementation": "static", "compile_config": compile_config}

    def gen_config(n: int) -> GenerationConfig:
        # A fresh config: the checkpoint's generation_config.json asks for sampling (temperature 0.6, top_p).
        if a.eos == "ignore":
            return GenerationConfig(do_sample=False, max_new_tokens=n, pad_token_id=pad_id, eos_token_id=None,
                                    bos_token_id=model.config.bos_token_id, **cache)
        return GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id,
                                eos_token_id=eos_id, bos_token_id=model.config.bos_token_id, **cache)

    def generate(batch: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config(n))
        dt = time.perf_counter() - t
        return dt, out[:, width:].tolist()

    if a.serve:
        serve(lambda batch, n: generate(batch, n)[1], prompts, fd)
        return

    def timed(batch: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
        runs = [generate(batch, n) for _ in range(a.repeats)]
        return statistics.median(r[0] for r in runs), runs[-1][1]

    split = not a.no_prefill_split and a.max_tokens > 1
    cmax = max(a.concurrency)
    results, consistent = [], {}
    generate([prompts[0]], a.max_tokens)  # warm-up (first-call allocations, oneDNN/MKL init)

    seq_tokens: list[list[int]] = []
    if "sequential" in modes:
        seq_times, seq_pre = [], []
        for p in take(prompts, cmax):
            dt, toks = timed([p], a.max_tokens)
            seq_times.append(dt)
            seq_tokens.append(toks[0])
            if split:
                seq_pre.append(timed([p], 1)[0])
        for c in a.concurrency:
            secs = sum(seq_times[:c])
            ntok = sum(len(t) for t in seq_tokens[:c])
            row = {"concurrency": c, "mode": "sequential", "tokens": ntok, "seconds": round(secs, 4),
                   "tokens_per_s": round(ntok / secs, 2)}
            if split:
                pre = sum(seq_pre[:c])
                row["prefill_seconds"] = round(pre, 4)
                row["decode_tokens_per_s"] = round((ntok - c) / (secs - pre), 2) if secs > pre else None
            results.append(row)
            print(f"[hf] {row}", file=sys.stderr, flush=True)

    if "batch" in modes:
        for c in a.concurrency:
            batch = take(prompts, c)
            generate(batch, a.max_tokens)  # warm-up at this batch size
            secs, toks = timed(batch, a.max_tokens)
            ntok = sum(len(t) for t in toks)
            row = {"concurrency": c, "mode": "batch", "tokens": ntok, "seconds": round(secs, 4),
                   "tokens_per_s": round(ntok / secs, 2)}
            if split:
                pre = timed(batch, 1)[0]
                row["prefill_seconds"] = round(pre, 4)
                row["decode_tokens_per_s"] = round((ntok - c) / (secs - pre), 2) if secs > pre else None
            results.append(row)
            print(f"[hf] {row}", file=sys.stderr, flush=True)
            if seq_tokens:
                n = min(c, len(seq_tokens))
                consistent[str(c)] = toks[:n] == seq_tokens[:n]
            if not seq_tokens and c == cmax:
                seq_tokens = toks

    out = {"peer": "hf", "results": results, "greedy_tokens": seq_tokens[:len(prompts)],
           "batch_consistent": consistent,
           "config": {"model": a.model, "max_tokens": a.max_tokens, "dtype": a.dtype, "cache": a.cache,
                      "repeats": a.repeats, "torch_threads": torch.get_num_threads(),
                      "transformers": transformers.__version__, "torch": torch.__version__,
                      "load_seconds": round(load_s, 2), "pad_token_id": pad_id, "eos": a.eos}}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
