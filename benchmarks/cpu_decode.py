"""CPU decode benchmark: raymoe's engine against transformers' `generate` and vLLM's CPU build, on the same tiny
checkpoint, prompts and greedy settings, in one run; checks that raymoe's greedy tokens equal vLLM's.

    .venv/bin/python benchmarks/cpu_decode.py [--max-tokens 64] [--concurrency 1,8,32] [--skip-vllm]

raymoe runs eager and with `cpu_compile` (decode and MTP-verification steps through torch.compile; the compile
warm-up is reported apart and excluded, as each peer's start-up is).
Needs `bash benchmarks/setup_vllm.sh` once (vLLM in its own venv under .cache/). Throughput is generated tokens
over the wall time of the whole batch (prefill included), as each peer's offline API is used; every request makes
exactly max_tokens tokens (ignore_eos). The peers run one at a time, so no two share the 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
from prompts import load_prompts, make_prompts, take  # noqa: E402


def run_peer(cmd: list[str], log: Path) -> dict:
    with open(log, "w") as err:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[1]} failed (exit {out.returncode}); see {log}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_raymoe(model: str, prompts: list[list[int]], max_tokens: int, conc: list[int], threads: int, mtp: int,
                 repeats: int, compiled: bool = False) -> dict:
    import torch

    from raymoe.platform.config import EngineConfig, SamplingParams
    from raymoe.platform.engine import LLMEngine
    eng = LLMEngine(EngineConfig(model=model, dtype="float32", cpu_threads=threads, num_speculative_tokens=mtp,
                                 max_num_seqs=64, kv_cache_memory_gb=1.0, cpu_compile=compiled))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    rows, tokens, spec = [], None, (0, 0)
    t = time.perf_counter()
    eng.generate([prompts[0]], params)                                   # warm-up (compiles the single-sequence graph)
    warmup = time.perf_counter() - t
    for c in conc:
        batch = take(prompts, c)
        t = time.perf_counter()
        eng.generate(batch, params)                                      # warm-up (and the batch graph)
        warmup += time.perf_counter() - t
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            res = eng.generate(batch, params)
            runs.append(time.perf_counter() - t)
        secs = statistics.median(runs)
        t = time.perf_counter()
        eng.generate(batch, first)
        pre = time.perf_counter() - t
        n = sum(len(r["outputs"][0]["token_ids"]) for r in res)
        rows.append({"concurrency": c, "tokens": n, "seconds": round(secs, 4), "tokens_per_s": round(n / secs, 2),
                     "prefill_seconds": round(pre, 4),
                     "decode_tokens_per_s": round((n - c) / (secs - pre), 2) if secs > pre else None})
        if c == max(conc):
            tokens = [r["outputs"][0]["token_ids"] for r in res]
        p = sum(r["outputs"][0]["spec"][0] for r in res)
        a = sum(r["outputs"][0]["spec"][1] for r in res)
        spec = (spec[0] + p, spec[1] + a)
        print(f"[raymoe threads={threads} mtp={mtp} compiled={compiled}] {rows[-1]}", file=sys.stderr, flush=True)
    if compiled and eng.runner.compiled.failed:
        raise RuntimeError(f"cpu_compile fell back to eager: {eng.runner.compiled.failed}")
    return {"peer": "raymoe", "results": rows, "greedy_tokens": tokens, "torch_threads": torch.get_num_threads(),
            "mtp_acceptance": spec[1] / spec[0] if spec[0] else None, "compiled": compiled,
            "warmup_seconds": round(warmup, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / ".cache" / "bench-vllm-tiny"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--out", default=str(ROOT / ".cache" / "cpu_decode.json"))
    a = ap.parse_args()
    conc = [int(x) for x in a.concurrency.split(",")]
    model = Path(a.model)
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "raymoe.cli", "tiny-checkpoint", str(model), "--preset", "vllm",
                        "--dtype", "float32"], check=True)
    pfile = model.parent / "bench-prompts.json"
    pfile.write_text(json.dumps(make_prompts(model, n=max(conc), min_len=16, max_len=64, seed=0)))
    prompts = load_prompts(pfile)
    logs = model.parent
    common = ["--model", str(model), "--prompts", str(pfile), "--max-tokens", str(a.max_tokens), "--concurrency",
              a.concurrency, "--repeats", str(a.repeats), "--no-prefill-split"]
    report: dict = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "max_tokens": a.max_tokens}
    report["raymoe_1t"] = bench_raymoe(str(model), prompts, a.max_tokens, conc, 1, 0, a.repeats)
    report["raymoe_2t"] = bench_raymoe(str(model), prompts, a.max_tokens, conc, 2, 0, a.repeats)
    report["raymoe_c1t"] = bench_raymoe(str(model), prompts, a.max_tokens, conc, 1, 0, a.repeats, compiled=True)
    report["raymoe_c2t"] = bench_raymoe(str(model), prompts, a.max_tokens, conc, 2, 0, a.repeats, compiled=True)
    report["raymoe_mtp"] = bench_raymoe(str(model), prompts, a.max_tokens, conc, 1, 1, a.repeats, compiled=True)
    report["hf"] = run_peer([sys.executable, str(HERE / "peers" / "hf_peer.py"), *common, "--eos", "ignore"],
                            logs / "hf_peer.log")
    vpy = ROOT / ".cache" / "vllm-venv" / "bin" / "python"
    if not a.skip_vllm:
        if not vpy.exists():
            raise SystemExit("vLLM venv missing: run `bash benchmarks/setup_vllm.sh` first (or pass --skip-vllm)")
        report["vllm"] = run_peer([str(vpy), str(HERE / "peers" / "vllm_peer.py"), *common], logs / "vllm_peer.log")
    Path(a.out).write_text(json.dumps(report, indent=1))

    def rate(peer: str, c: int, mode: str | None = None) -> float:
        for r in report[peer]["results"]:
            if r["concurrency"] == c and (mode is None or r.get("mode") == mode):
                return r["tokens_per_s"]
        return float("nan")
    print(f"\nCPU decode, tiny 'vllm' preset (fp32), {a.max_tokens} greedy tokens per request, "
          f"{os.cpu_count()} cores, tokens/s (generated tokens / wall time, prefill included)\n")
    ours = ("raymoe_1t", "raymoe_2t", "raymoe_c1t", "raymoe_c2t")
    head = ("| concurrency | raymoe eager 1 thread | raymoe eager 2 threads | raymoe compiled 1 thread | "
            "raymoe compiled 2 threads | raymoe compiled + MTP k=1 | HF generate (batch) | HF sequential")
    head += " | vLLM CPU | raymoe/HF batch | raymoe/HF sequential | raymoe/vLLM |" if "vllm" in report else \
        " | raymoe/HF batch | raymoe/HF sequential |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for c in conc:
        best = max(rate(k, c) for k in ours)
        row = (f"| {c} | " + " | ".join(f"{rate(k, c):.0f}" for k in (*ours, "raymoe_mtp")) +
               f" | {rate('hf', c, 'batch'):.0f} | {rate('hf', c, 'sequential'):.0f} |")
        if "vllm" in report:
            row += f" {rate('vllm', c):.0f} |"
        row += f" {best / rate('hf', c, 'batch'):.1f}x | {best / rate('hf', c, 'sequential'):.1f}x |"
        if "vllm" in report:
            row += f" {best / rate('vllm', c):.2f}x |"
        print(row)
    print(f"\ncompile warm-up (first use of each shape class, included in no figure above): "
          f"{report['raymoe_c1t']['warmup_seconds']} s (1 thread), {report['raymoe_c2t']['warmup_seconds']} s (2)")
    same_compiled = all(report[k]["greedy_tokens"] == report["raymoe_1t"]["greedy_tokens"]
                        for k in ("raymoe_c1t", "raymoe_c2t", "raymoe_mtp"))
    print(f"compiled (and MTP) greedy tokens equal to eager: {same_compiled}")
    ours = report["raymoe_1t"]["greedy_tokens"]
    print(f"greedy tokens equal to HF's: {ours == report['hf']['greedy_tokens'][:len(ours)]}")
    if "vllm" in report:
        v = report["vllm"]["greedy_tokens"]
        same = sum(x == y for x, y in zip(ours, v))
        print(f"greedy tokens equal to vLLM's: {same}/{len(ours)} prompts identical")
    acc = report["raymoe_mtp"]["mtp_acceptance"]
    print(f"MTP k=1 acceptance on random weights: {acc:.1%} (meaningless for a random model; see the finetune MTP demo)")


if __name__ == "__main__":
    main()
