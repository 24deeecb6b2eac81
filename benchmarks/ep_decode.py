"""Expert-parallel decode overhead: the same model decoding with its routed experts in the engine's process and on
1 / 2 / 4 expert shards through each transport (local objects, Ray actor calls, a gloo collective), and the time each
adds per MoE layer per step; then one MoE-layer exchange through Ray compiled graphs (ray.dag, shared-memory
channels) against a plain actor call, same shard, same rows. With --adapters K, per-request LoRA over the shards:
every request on one of K random rank-16 adapters (all targets, routed experts included: their factors live on the
shards, the rows' slots travel with the exchange) against the same engine's shape without adapters, same run.

    python benchmarks/ep_decode.py                       # CPU, the tiny model (written to a temp dir)
    python benchmarks/ep_decode.py --adapters 4 --shards 2 --batch 8 --no-exchange     # adapters over 2 shards
    python benchmarks/ep_decode.py --device cuda --full-width --shards 1 --transports collective --batch 1 32

--full-width writes a random checkpoint with DeepSeek-V3's widths (hidden 7168, MLA 128 heads, expert width 2048,
8 of 32 routed experts per token in 8 groups, 1 dense + 2 MoE layers; fewer experts than 256 only to keep the
file small: the exchange moves rows, not experts). The baseline is the eager in-process engine. On CUDA every
sharded engine runs twice, eager and with piecewise CUDA graphs (the segments between MoE exchanges graphed, the
exchanges eager), each in alternating rounds with the baseline (one after the other: a process holds one collective
group), and the graphed in-process engine is printed beside them for scale. The router is this process; shards are
Ray actors (fractional GPUs on one GPU with --device cuda).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import V3_DIMS  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# the release's widths; a smaller vocabulary and 32 routed experts (not 256) only to keep the file small
FULL_WIDTH = {**V3_DIMS, "vocab_size": 16384, "num_hidden_layers": 3, "first_k_dense_replace": 1,
              "n_routed_experts": 32, "num_nextn_predict_layers": 0}


def write_model(full_width: bool) -> str:
    from raymoe.platform.checkpoint import TinySpec, write_tiny_checkpoint
    out = tempfile.mkdtemp(prefix="ep-bench-")
    spec = TinySpec(seed=0, dtype="bfloat16" if full_width else "float32",
                    overrides=FULL_WIDTH if full_width else {"num_nextn_predict_layers": 0})
    write_tiny_checkpoint(out, spec)
    return out


class Decoder:
    """An engine with `batch` sequences in their decode phase; `time(steps)` is the median step (s)."""

    def __init__(self, path: str, device: str, batch: int, budget: int, shards: int = 0, transport: str = "local",
                 graphs: bool = False, adapters: list[str] | None = None) -> None:
        # adapters: PEFT folders; request i runs on adapter i % len (None: the base model only)
        from raymoe.platform.config import EngineConfig, ParallelConfig, SamplingParams
        from raymoe.platform.engine import LLMEngine
        gpu = device == "cuda"
        par = ParallelConfig(num_shards=shards, transport=transport, cpus_per_shard=1.0, router_cpus=1.0,
                             gpus_per_shard=0.5 if gpu else 0.0,
                             **({"piecewise_graphs": True} if gpu and shards else {}))
        self.eng = LLMEngine(EngineConfig(
            model=path, device=device, dtype="bfloat16" if gpu else "float32", block_size=16,
            num_blocks=batch * (-(-(budget + 40) // 16)) + 8, enforce_eager=not graphs, cuda_graph_sizes=[1, 8, 32],
            enable_prefix_caching=False, parallel=par, max_loras=max(1, len(adapters or [])), max_lora_rank=16))
        for i, p in enumerate(adapters or []):
            self.eng.load_adapter(f"a{i}", p)
        g = torch.Generator().manual_seed(batch)
        for i in range(batch):
            params = SamplingParams(temperature=0, max_tokens=budget + 20, ignore_eos=True,
                                    adapter=f"a{i % len(adapters)}" if adapters else None)
            self.eng.add_request(f"b{i}", torch.randint(3, 1000, (16,), generator=g).tolist(), params)
        for _ in range(10):                        # prefill, then decode warm-up (graph capture)
            self.eng.step()
        self.moe_layers = len(self.eng.model.moe_layers())

    def time(self, steps: int) -> float:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            self.eng.step()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def close(self) -> None:
        self.eng.close()


def alternate(decoders: list[Decoder], steps: int, rounds: int) -> list[float]:
    """Median steps of engines measured in alternating rounds (the same machine state for all)."""
    times: list[list[float]] = [[] for _ in decoders]
    for _ in range(rounds):
        for dec, ts in zip(decoders, times):
            ts.append(dec.time(steps))
    return [statistics.median(ts) for ts in times]


def exchange_times(path: str, batch: int, reps: int, gpu: bool) -> dict[str, float]:
    """One MoE layer's exchange with one shard actor: a plain actor call against a compiled graph (ray.dag)."""
    import ray
    from ray.dag import InputNode

    from raymoe.platform.config import ModelConfig
    from raymoe.platform.parallel.shard import ExpertShard
    cfg = ModelConfig.from_pretrained(path)
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    dev = "cuda" if gpu else "cpu"
    dtype = "bfloat16" if gpu else "float32"
    experts = {layer: list(range(cfg.n_routed_experts))}
    opts = dict(num_cpus=1, num_gpus=0.5 if gpu else 0)
    x = torch.randn(batch, cfg.hidden_size, dtype=getattr(torch, dtype))
    ids = torch.stack([torch.randperm(cfg.n_routed_experts)[:cfg.num_experts_per_tok] for _ in range(batch)])
    w = torch.rand(batch, cfg.num_experts_per_tok)
    out = {}
    actor = ray.remote(ExpertShard).options(**opts).remote(path, experts, dtype, dev)
    ray.get(actor.ping.remote())
    for _ in range(5):
        ray.get(actor.compute.remote(layer, x, ids, w))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        ray.get(actor.compute.remote(layer, x, ids, w))
        ts.append(time.perf_counter() - t)
    out["actor call"] = statistics.median(ts)
    ray.kill(actor)
    actor = ray.remote(ExpertShard).options(**opts).remote(path, experts, dtype, dev)
    ray.get(actor.ping.remote())
    try:
        with InputNode() as inp:
            dag = actor.compute.bind(inp[0], inp[1], inp[2], inp[3])
        compiled = dag.experimental_compile()
        for _ in range(5):
            ray.get(compiled.execute(layer, x, ids, w))
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            ray.get(compiled.execute(layer, x, ids, w))
            ts.append(time.perf_counter() - t)
        out["compiled graph"] = statistics.median(ts)
        compiled.teardown()
    except Exception as e:                              # noqa: BLE001 - report why it could not run
        print(f"compiled graph failed: {type(e).__name__}: {str(e).splitlines()[0]}")
    ray.kill(actor)
    with torch.inference_mode():                        # the shard's compute alone, in this process
        local = ExpertShard(path, experts, dtype, dev)
        for _ in range(5):
            local.compute(layer, x, ids, w)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            local.compute(layer, x, ids, w)
            if gpu:
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        out["in-process compute"] = statistics.median(ts)
    return out


def adapter_table(path: str, a) -> None:
    """Per-request adapters over the shards: each sharded engine with every request on one of K adapters against
    the same engine without adapters (alternating rounds, same run); the in-process engine likewise, for scale."""
    from multi_lora import write_random_adapter

    from raymoe.platform.model import from_pretrained
    model = from_pretrained(path, dtype=torch.float32, device="cpu")
    root = Path(tempfile.mkdtemp(prefix="ep-bench-adapters-"))
    paths = [str(write_random_adapter(model, root / f"a{i}", 16, seed=i)) for i in range(a.adapters)]
    del model
    print(f"\nper-request adapters ({a.adapters} of rank 16, all targets; request i on adapter i % {a.adapters}) "
          f"against no adapters, same engine shape, alternating rounds")
    print(f"{'batch':>5} {'engine':<22} {'lora ms':>9} {'base ms':>9} {'lora/base':>10}")
    budget = a.steps * a.rounds * 2 + 20
    engines = [("in-process", 0, "local")] + [(f"{t} x{n}", n, t) for t in a.transports for n in a.shards if n]
    for batch in a.batch:
        for name, n, t in engines:       # one pair at a time: a process holds one collective group
            base = Decoder(path, a.device, batch, budget, n, t)
            lora = Decoder(path, a.device, batch, budget, n, t, adapters=paths) if n == 0 or t != "collective" \
                else None
            if lora is None:              # collective: one group per process, so the two engines take turns
                t0 = alternate([base], a.steps, a.rounds)[0]
                base.close()
                lora = Decoder(path, a.device, batch, budget, n, t, adapters=paths)
                t1 = alternate([lora], a.steps, a.rounds)[0]
            else:
                t0, t1 = alternate([base, lora], a.steps, a.rounds)
                base.close()
            lora.close()
            print(f"{batch:>5} {name:<22} {t1 * 1e3:>9.2f} {t0 * 1e3:>9.2f} {t1 / t0:>10.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: write one)")
    ap.add_argument("--full-width", action="store_true")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--transports", nargs="+", default=["local", "ray", "collective"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the router (CPU)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-exchange", action="store_true", help="skip the actor call / compiled graph exchange")
    ap.add_argument("--adapters", type=int, default=0, help="K > 0: also time K adapters over the shards")
    ap.add_argument("--adapters-only", action="store_true", help="only the adapters table")
    a = ap.parse_args()
    import ray
    torch.set_num_threads(a.threads)
    path = a.model or write_model(a.full_width)
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             num_cpus=max(8, os.cpu_count() or 1), num_gpus=1 if a.device == "cuda" else 0)
    gpu = a.device == "cuda"
    print(f"model {path}  device {a.device}  torch {torch.__version__}  router threads {a.threads}")
    if not a.adapters_only:
        print("decode step: each engine against the eager in-process engine, alternating rounds of steps (same run)")
        print(f"{'batch':>5} {'engine':<22} {'step ms':>9} {'base ms':>9} {'vs base':>8} {'added/MoE layer ms':>19}")
    rounds = a.rounds
    # (name, shards, transport, graphs): on CUDA each sharded engine eager and with piecewise graphs
    engines = [("in-process (graphs)", 0, "local", True)] if gpu else []
    for t in a.transports:
        for n in a.shards:
            engines.append((f"{t} x{n}", n, t, False))
            if gpu:
                engines.append((f"{t} x{n} piecewise", n, t, True))
    budget = a.steps * rounds * (len(engines) + 1) + 20
    for batch in [] if a.adapters_only else a.batch:
        base = Decoder(path, a.device, batch, budget)
        eager: dict[tuple[int, str], float] = {}
        for name, n, t, graphs in engines:   # one at a time: a process holds one collective group
            dec = Decoder(path, a.device, batch, budget, n, t, graphs)
            t0, t1 = alternate([base, dec], a.steps, rounds)
            dec.close()
            added = "" if n == 0 else f"{(t1 - t0) / base.moe_layers * 1e3:.3f}"
            print(f"{batch:>5} {name:<22} {t1 * 1e3:>9.2f} {t0 * 1e3:>9.2f} {t1 / t0:>8.2f} {added:>19}", flush=True)
            if n and not graphs:
                eager[n, t] = t1 / t0
            elif n:                          # each against the same baseline: the ratio of their ratios
                print(f"{batch:>5} {'  piecewise / eager':<22} {t1 / t0 / eager[n, t]:>9.3f}", flush=True)
        base.close()
    if a.adapters:
        adapter_table(path, a)
    if a.no_exchange:
        return
    print("\none MoE layer's exchange with one shard (median of 200)")
    for batch in a.batch:
        for name, t in exchange_times(path, batch, 200, gpu).items():
            print(f"{batch:>5} {name:<22} {t * 1e3:>9.3f} ms")


if __name__ == "__main__":
    main()
