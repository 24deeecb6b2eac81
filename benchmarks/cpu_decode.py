"""CPU decode benchmark: raymoe (fp32 and bf16, eager and compiled) against transformers' batched `generate`
(dynamic cache, eager; static cache + transformers' torch.compile) and vLLM's CPU build (bf16, its default
compilation; and eager), on the same tiny checkpoint, prompts and greedy settings, interleaved in one run.

    bash benchmarks/setup_vllm.sh
    .venv/bin/python benchmarks/cpu_decode.py [--max-tokens 64] [--concurrency 1,8,32] [--rounds 3] [--engines ...]

Every engine runs in its own process (benchmarks/peers/*_peer.py), loads once and is warmed up at every
concurrency, twice (compilation, weight packing: untimed, as every peer's start-up is). Then, for each round, each
concurrency and each engine in turn (the order rotates every round), one timed batch: the c first prompts at once,
64 greedy tokens each (ignore_eos). So every engine's timed runs are spread over the same minutes and share
whatever else loads the machine; the machine's load averages (`/proc/loadavg`) are recorded before and after.
Throughput is generated tokens over the wall time of the batch (prefill included), the median over the rounds.
Greedy tokens of the c = max batch are compared with raymoe fp32 eager (identical prompts; the first step that
differs is reported).
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
from prompts import make_prompts  # noqa: E402

PY = sys.executable
VLLM_PY = str(ROOT / ".cache" / "vllm-venv" / "bin" / "python")
# name -> (interpreter, script, arguments, kind: "eager" | "compiled", dtype)
ENGINES: dict[str, tuple[str, str, list[str], str, str]] = {
    "raymoe-fp32-eager": (PY, "raymoe_peer.py", ["--dtype", "float32"], "eager", "fp32"),
    "raymoe-fp32-compiled": (PY, "raymoe_peer.py", ["--dtype", "float32", "--compile"], "compiled", "fp32"),
    "raymoe-bf16-eager": (PY, "raymoe_peer.py", ["--dtype", "bfloat16"], "eager", "bf16"),
    "raymoe-bf16-compiled": (PY, "raymoe_peer.py", ["--dtype", "bfloat16", "--compile"], "compiled", "bf16"),
    "raymoe-bf16-compiled-2t": (PY, "raymoe_peer.py", ["--dtype", "bfloat16", "--compile", "--threads", "2"],
                                "compiled", "bf16"),
    "hf-fp32-dynamic": (PY, "hf_peer.py", ["--dtype", "float32", "--cache", "dynamic", "--eos", "ignore"],
                        "eager", "fp32"),
    "hf-fp32-static-compiled": (PY, "hf_peer.py", ["--dtype", "float32", "--cache", "static", "--eos", "ignore"],
                                "compiled", "fp32"),
    "hf-bf16-static-compiled": (PY, "hf_peer.py", ["--dtype", "bfloat16", "--cache", "static", "--eos", "ignore"],
                                "compiled", "bf16"),
    "vllm-bf16-default": (VLLM_PY, "vllm_peer.py", ["--dtype", "bfloat16", "--compilation", "default"],
                          "compiled", "bf16"),
    "vllm-bf16-eager": (VLLM_PY, "vllm_peer.py", ["--dtype", "bfloat16", "--compilation", "eager"], "eager", "bf16"),
}
REFERENCE = "raymoe-fp32-eager"


class Engine:
    """One engine process speaking interleave.py's protocol."""

    def __init__(self, name: str, model: Path, prompts: Path, logs: Path) -> None:
        py, script, args, self.kind, self.dtype = ENGINES[name]
        self.name = name
        self.log = logs / f"{name}.log"
        cmd = [py, str(HERE / "peers" / script), "--model", str(model), "--prompts", str(prompts), "--serve", *args]
        if script == "raymoe_peer.py":
            cmd.remove("--serve")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     text=True, cwd=ROOT, bufsize=1)
        self._read()                                              # {"ready": true} once loaded

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited (code {self.proc.wait()}); see {self.log}")
        return json.loads(line)

    def run(self, c: int, n: int) -> dict:
        self.proc.stdin.write(json.dumps({"op": "run", "c": c, "max_tokens": n}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except Exception:                                          # noqa: BLE001 - a dead peer: make sure it ends
            self.proc.kill()


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / ".cache" / "bench-vllm-tiny"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--out", default=str(ROOT / ".cache" / "cpu_decode.json"))
    a = ap.parse_args()
    conc = [int(x) for x in a.concurrency.split(",")]
    names = [x for x in a.engines.split(",") if x]
    model = Path(a.model)
    if not (model / "config.json").is_file():
        subprocess.run([PY, "-m", "raymoe.cli", "tiny-checkpoint", str(model), "--preset", "vllm", "--dtype",
                        "float32"], check=True)
    pfile = model.parent / "bench-prompts.json"
    pfile.write_text(json.dumps(make_prompts(model, n=max(conc), min_len=16, max_len=64, seed=0)))
    logs = model.parent / "cpu_decode_logs"
    logs.mkdir(exist_ok=True)
    load = [Path("/proc/loadavg").read_text().split()[:3]]
    engines: dict[str, Engine] = {}
    warm: dict[str, float] = {}
    try:
        for name in names:                      # one at a time: loading and compiling never overlap a timing
            t = time.perf_counter()
            engines[name] = Engine(name, model, pfile, logs)
            for c in conc * 2:                  # twice: a graph recompiled on the way back to a shape is warm too
                engines[name].run(c, a.max_tokens)
            warm[name] = time.perf_counter() - t
            print(f"[{name}] loaded and warmed up in {warm[name]:.0f} s", file=sys.stderr, flush=True)
        load.append(Path("/proc/loadavg").read_text().split()[:3])
        times: dict[tuple[str, int], list[float]] = {}
        tokens: dict[str, list[list[int]]] = {}
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for c in conc:
                for name in order:
                    res = engines[name].run(c, a.max_tokens)
                    times.setdefault((name, c), []).append(res["seconds"])
                    if c == max(conc):
                        tokens[name] = res["tokens"]
            done = {f"{n}@{c}": v for (n, c), v in times.items()}
            Path(a.out).with_suffix(".partial.json").write_text(json.dumps({"seconds": done, "load": load}))
            print(f"round {r + 1}/{a.rounds} done, load {Path('/proc/loadavg').read_text().split()[:3]}: "
                  f"{json.dumps(done)}", file=sys.stderr, flush=True)
        load.append(Path("/proc/loadavg").read_text().split()[:3])
    finally:
        for e in engines.values():
            e.close()

    rate = {(n, c): c * a.max_tokens / statistics.median(times[n, c]) for n in names for c in conc}
    ref = tokens.get(REFERENCE)
    same = {}
    for n in names:
        if ref is None:
            break
        diffs = [first_difference(x, y) for x, y in zip(ref, tokens[n])]
        same[n] = {"identical": sum(d is None for d in diffs), "of": len(diffs),
                   "median_first_difference": statistics.median([a.max_tokens if d is None else d for d in diffs])}
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "max_tokens": a.max_tokens,
              "rounds": a.rounds, "loadavg_start_warm_end": load, "warmup_seconds": warm,
              "seconds": {f"{n}@{c}": v for (n, c), v in times.items()},
              "tokens_per_s": {f"{n}@{c}": round(v, 1) for (n, c), v in rate.items()}, "greedy_vs_reference": same}
    Path(a.out).write_text(json.dumps(report, indent=1))

    print(f"\nCPU decode, tiny 'vllm' preset, {a.max_tokens} greedy tokens per request, {os.cpu_count()} cores, "
          f"tokens/s (generated tokens / wall time of the batch, prefill included), median of {a.rounds} "
          f"interleaved rounds; load averages (1/5/15 min) at start {load[0]}, after warm-up {load[1]}, "
          f"at end {load[-1]}\n")
    print("| engine | kind | dtype | " + " | ".join(f"c={c}" for c in conc) + " | greedy tokens = raymoe fp32 eager |")
    print("| --- | --- | --- | " + " --- |" * len(conc) + " --- |")
    for n in names:
        s = same.get(n, {})
        print(f"| {n} | {engines[n].kind} | {engines[n].dtype} | " +
              " | ".join(f"{rate[n, c]:,.0f}" for c in conc) +
              f" | {s.get('identical')}/{s.get('of')} (median first difference at token "
              f"{s.get('median_first_difference')}) |")
    best = lambda pred: {c: max(((rate[n, c], n) for n in names if pred(n)), default=(float("nan"), "-"))
                         for c in conc}
    ours = best(lambda n: n.startswith("raymoe"))
    print("\n| ratio | " + " | ".join(f"c={c}" for c in conc) + " |")
    print("| --- |" + " --- |" * len(conc))
    for label, pred in [("raymoe best / vLLM bf16 best", lambda n: n.startswith("vllm")),
                        ("raymoe best / transformers best", lambda n: n.startswith("hf"))]:
        peer = best(pred)
        print(f"| {label} | " + " | ".join(f"{ours[c][0] / peer[c][0]:.2f}x ({ours[c][1]} / {peer[c][1]})"
                                          for c in conc) + " |")
    for kind in ("eager", "compiled"):
        for dt in ("fp32", "bf16"):
            mine = best(lambda n, k=kind, d=dt: n.startswith("raymoe") and ENGINES[n][3] == k and ENGINES[n][4] == d)
            for peer_name in ("vllm", "hf"):
                peer = best(lambda n, k=kind, d=dt, p=peer_name: n.startswith(p) and ENGINES[n][3] == k
                            and ENGINES[n][4] == d)
                if peer[conc[0]][1] == "-" or mine[conc[0]][1] == "-":
                    continue
                print(f"| raymoe {kind} {dt} / {peer_name} {kind} {dt} | " +
                      " | ".join(f"{mine[c][0] / peer[c][0]:.2f}x" for c in conc) + " |")


if __name__ == "__main__":
    main()
