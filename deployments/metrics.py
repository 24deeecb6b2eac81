"""Metrics for the whole app, in Prometheus text with vLLM's names, gathered in one place.

Each ingress replica times its requests (TTFT, inter-token latency, end-to-end; token counts) into a local
`RequestMetrics` buffer and flushes it about once a second; each model replica reports its engine's gauges and
counters (`EngineReport`). Both go to `MetricsCollector`, a one-replica Serve deployment of the same app, which
/metrics renders: so the numbers cover every replica, not the one that answers. Gauges carry a `replica` label
(`sum()` them for the app); a replica that stops reporting is dropped after a few intervals, its counters kept.
vLLM's names and units where vLLM has the metric, `raymoe:` for the rest. This module never touches the engine.
"""
from __future__ import annotations

import time

from pydantic import BaseModel, Field
from ray import serve

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0]
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": "Time to first token (from arrival at the ingress).",
    "vllm:inter_token_latency_seconds": "Time between output tokens.",
    "vllm:e2e_request_latency_seconds": "End-to-end request latency.",
}
COUNTERS = {
    "vllm:prompt_tokens_total": "Prefill tokens processed.",
    "vllm:generation_tokens_total": "Generation tokens produced.",
    "vllm:spec_decode_num_draft_tokens_total": "MTP draft tokens proposed.",
    "vllm:spec_decode_num_accepted_tokens_total": "MTP draft tokens accepted.",
}


class Histogram(BaseModel):
    buckets: list[int] = Field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    sum: float = 0.0
    count: int = 0

    def observe(self, v: float, times: int = 1) -> None:
        i = next((i for i, b in enumerate(LATENCY_BUCKETS) if v <= b), len(LATENCY_BUCKETS))
        self.buckets[i] += times
        self.sum += v * times
        self.count += times

    def merge(self, o: "Histogram") -> None:
        self.buckets = [a + b for a, b in zip(self.buckets, o.buckets)]
        self.sum += o.sum
        self.count += o.count


class MetricsBatch(BaseModel):
    """What one ingress replica observed since its last flush."""
    histograms: dict[str, Histogram] = Field(default_factory=dict)
    counters: dict[str, float] = Field(default_factory=dict)
    finished: dict[str, int] = Field(default_factory=dict)     # finish_reason -> requests
    rejected: dict[str, int] = Field(default_factory=dict)     # why -> requests (429, 503, 400...)

    def empty(self) -> bool:
        return not (self.histograms or self.counters or self.finished or self.rejected)


class EngineReport(BaseModel):
    """One model replica's engine, now. Counters are cumulative since the replica started."""
    replica: str
    running: int
    waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0
    expert_load: dict[int, list[int]] = Field(default_factory=dict)   # MoE layer -> tokens routed to each expert
    max_lora: int = 0
    running_adapters: list[str] = Field(default_factory=list)     # LoRA adapters of running requests
    waiting_adapters: list[str] = Field(default_factory=list)     # ... and of waiting ones


class RequestMetrics:
    """The ingress replica's local buffer (no locks: used from its one event loop)."""

    def __init__(self) -> None:
        self.batch = MetricsBatch()

    def hist(self, name: str, v: float, times: int = 1) -> None:
        self.batch.histograms.setdefault(name, Histogram()).observe(v, times)

    def count(self, name: str, v: float, table: str = "counters") -> None:
        t = getattr(self.batch, table)
        t[name] = t.get(name, 0) + v

    def drain(self) -> MetricsBatch | None:
        b, self.batch = self.batch, MetricsBatch()
        return None if b.empty() else b


@serve.deployment(num_replicas=1, max_ongoing_requests=10000, ray_actor_options={"num_cpus": 0},
                  graceful_shutdown_wait_loop_s=0.2,
                  logging_config={"enable_access_log": False})
class MetricsCollector:
    def __init__(self, stale_after_s: float = 5.0) -> None:
        self.total = MetricsBatch()
        self.replicas: dict[str, tuple[float, EngineReport]] = {}
        self.retired = EngineReport(replica="retired", running=0, waiting=0, kv_cache_usage=0)
        self.stale_after_s = stale_after_s

    def add(self, b: MetricsBatch) -> None:
        for k, h in b.histograms.items():
            self.total.histograms.setdefault(k, Histogram()).merge(h)
        for table in ("counters", "finished", "rejected"):
            mine = getattr(self.total, table)
            for k, v in getattr(b, table).items():
                mine[k] = mine.get(k, 0) + v

    def report(self, r: EngineReport) -> None:
        self.replicas[r.replica] = (time.monotonic(), r)

    def _live(self) -> list[EngineReport]:
        now = time.monotonic()
        for rid, (t, r) in list(self.replicas.items()):
            if now - t > self.stale_after_s:        # gone (scaled down or dead): keep its counters only
                for f in ("prefix_cache_queries", "prefix_cache_hits", "preemptions"):
                    setattr(self.retired, f, getattr(self.retired, f) + getattr(r, f))
                for layer, counts in r.expert_load.items():
                    old = self.retired.expert_load.get(layer, [0] * len(counts))
                    self.retired.expert_load[layer] = [a + c for a, c in zip(old, counts)]
                del self.replicas[rid]
        return [r for _, r in self.replicas.values()]

    def render(self, model_name: str) -> str:
        live = self._live()
        lab = f'model_name="{model_name}"'
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}")
            out.extend(f"{name}{{{labels}}} {value}" for labels, value in samples)

        for name, help_ in HISTOGRAMS.items():
            h = self.total.histograms.get(name, Histogram())
            out.append(f"# HELP {name} {help_}\n# TYPE {name} histogram")
            acc = 0
            for b, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], h.buckets):
                acc += n
                out.append(f'{name}_bucket{{{lab},le="{b}"}} {acc}')
            out.append(f"{name}_sum{{{lab}}} {h.sum}\n{name}_count{{{lab}}} {h.count}")
        for name, help_ in COUNTERS.items():
            metric(name, "counter", help_, [(lab, self.total.counters.get(name, 0))])
        metric("vllm:request_success_total", "counter", "Finished requests by finish reason.",
               [(f'{lab},finished_reason="{k}"', v) for k, v in sorted(self.total.finished.items())])
        metric("raymoe:requests_rejected_total", "counter", "Requests refused, by HTTP status.",
               [(f'{lab},status="{k}"', v) for k, v in sorted(self.total.rejected.items())])
        per = [(f'{lab},replica="{r.replica}"', r) for r in live]
        metric("vllm:num_requests_running", "gauge", "Requests in the engines' running batches.",
               [(lb, r.running) for lb, r in per])
        metric("vllm:num_requests_waiting", "gauge", "Requests waiting in the engines' queues.",
               [(lb, r.waiting) for lb, r in per])
        metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage (1 = full).",
               [(lb, r.kv_cache_usage) for lb, r in per])
        now = time.time()
        metric("vllm:lora_requests_info", "gauge", "LoRA adapters of the running and waiting requests (labels; the "
               "value is the report's time, as vLLM).",
               [(f'{lb},max_lora="{r.max_lora}",running_lora_adapters="{",".join(r.running_adapters)}",'
                 f'waiting_lora_adapters="{",".join(r.waiting_adapters)}"', now) for lb, r in per])
        queries = self.retired.prefix_cache_queries + sum(r.prefix_cache_queries for r in live)
        hits = self.retired.prefix_cache_hits + sum(r.prefix_cache_hits for r in live)
        metric("raymoe:prefix_cache_queries_total", "counter", "Prefix-cache lookups, one per admitted sequence "
               "(vLLM counts tokens under its name, so this is raymoe:).",
               [(lab, queries)])
        metric("raymoe:prefix_cache_hits_total", "counter", "Prefix-cache lookups that reused cached blocks.",
               [(lab, hits)])
        metric("raymoe:prefix_cache_hit_rate", "gauge", "prefix_cache_hits_total / prefix_cache_queries_total.",
               [(lab, hits / queries if queries else 0.0)])
        metric("vllm:num_preemptions_total", "counter", "Sequences preempted (recomputed later).",
               [(lab, self.retired.preemptions + sum(r.preemptions for r in live))])
        load: dict[int, list[int]] = {}
        for r in [self.retired, *live]:
            for layer, counts in r.expert_load.items():
                acc = load.setdefault(layer, [0] * len(counts))
                load[layer] = [a + c for a, c in zip(acc, counts)]
        metric("raymoe:expert_routed_tokens_total", "counter", "Tokens routed to the routed experts of each MoE "
               "layer (each token counts once per chosen expert).",
               [(f'{lab},layer="{layer}"', sum(c)) for layer, c in sorted(load.items())])
        metric("raymoe:expert_load_max_over_mean", "gauge", "Per MoE layer: the busiest expert's tokens over the "
               "mean (1 = balanced).",
               [(f'{lab},layer="{layer}"', max(c) * len(c) / sum(c) if sum(c) else 1.0)
                for layer, c in sorted(load.items())])
        metric("raymoe:num_replicas", "gauge", "Model replicas reporting.", [(lab, len(live))])
        return "\n".join(out) + "\n"
