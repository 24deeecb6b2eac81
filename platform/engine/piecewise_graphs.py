"""Piecewise CUDA graphs: one uniform step captured as the segments between its remote MoE exchanges.

A remote expert dispatch leaves the process (a host sync, a socket), so it can never be inside a CUDA graph. The
segments around it can: embedding + attention + gate up to the first layer's send; the shared expert (what runs
while the shards work); after the wait, combine + the next layers up to the next send; ...; the last segment ends
at the final norm. `PiecewiseGraph.capture(run)` runs the step once with every remote dispatch replaced by a cut
(`_Cut`) that ends the segment being captured and starts the next; `replay()` replays the segments in order and
calls the real dispatch between them, eagerly, on the tensors the previous segment wrote (the captured send's
inputs are static: the graph writes the same addresses each replay) and copies the routed output into the static
buffer the next segment reads. All segments share one memory pool and replay in capture order, as the captures
of one whole-step graph would. Per-row adapters (`multi_lora.RowLoraDispatch` over the remote dispatch): the cut
replaces the wrapper's inner dispatch, so the exchange records the factors the wrapper passed down while capturing,
whose slots are the graph's static slots input: each replay's exchange carries that replay's slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.platform.model.moe import ExpertDispatch, ExpertLora
from raymoe.platform.model.multi_lora import RowLoraDispatch


@dataclass
class _Exchange:
    """One MoE layer's exchange between two segments: its static inputs, the dispatch, and the static output."""
    dispatch: ExpertDispatch
    layer: int
    hidden: torch.Tensor          # [N, H] written by the segment before the send
    topk_ids: torch.Tensor        # [N, k]
    topk_w: torch.Tensor          # [N, k]
    lora: dict[str, ExpertLora] | None = None    # per-row factors: slots [N] a static input of the graph
    out: torch.Tensor | None = None      # [N, H] read by the segment after the wait
    pending: object = None


class _Cut(ExpertDispatch):
    """Stands in for a remote dispatch while a step is captured: the send and the wait each end a segment."""

    def __init__(self, graph: "PiecewiseGraph", inner: ExpertDispatch) -> None:
        self.graph, self.inner = graph, inner

    def send(self, layer, hidden, topk_ids, topk_w, lora=None):
        ex = _Exchange(self.inner, layer, hidden, topk_ids, topk_w, lora or None)
        self.graph._cut(("send", ex))
        return ex

    def wait(self, ex: _Exchange) -> torch.Tensor:
        self.graph._cut(("wait", ex))
        return ex.out


class PiecewiseGraph:
    """Segments (CUDA graphs) and the eager exchanges between them, in replay order."""

    def __init__(self, model, pool) -> None:
        self.model = model
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.steps: list = []            # CUDAGraph, or ("send" | "wait", _Exchange)
        self._graph: torch.cuda.CUDAGraph | None = None

    def _begin(self) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._graph.capture_begin(pool=self.pool)

    def _end(self) -> None:
        self._graph.capture_end()
        self.steps.append(self._graph)
        self._graph = None

    def _cut(self, exchange: tuple[str, _Exchange]) -> None:
        self._end()
        kind, ex = exchange
        if kind == "wait":               # the next segment reads the routed output from here (outside the pool)
            ex.out = torch.empty_like(ex.hidden)
        self.steps.append(exchange)
        self._begin()

    def capture(self, run) -> torch.Tensor:
        """Capture `run()` (one uniform step over static buffers) in segments; returns its static output."""
        # the dispatches to cut: the remote one, under a per-row LoRA wrapper if there is one
        owners = [m.dispatch if isinstance(m.dispatch, RowLoraDispatch) else m
                  for m in self.model.moe_layers() if m.dispatch is not None and m.dispatch.remote]
        attr = ["inner" if isinstance(o, RowLoraDispatch) else "dispatch" for o in owners]
        inner = [getattr(o, a) for o, a in zip(owners, attr)]
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            for o, a, d in zip(owners, attr, inner):
                setattr(o, a, _Cut(self, d))
            with torch.cuda.stream(stream), torch.inference_mode():
                self._begin()
                try:
                    out = run()
                    self._end()
                except BaseException:
                    if self._graph is not None:
                        self._graph.capture_end()
                    raise
        finally:
            for o, a, d in zip(owners, attr, inner):
                setattr(o, a, d)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def replay(self) -> None:
        for step in self.steps:
            if isinstance(step, torch.cuda.CUDAGraph):
                step.replay()
                continue
            kind, ex = step
            if kind == "send":
                ex.pending = ex.dispatch.send(ex.layer, ex.hidden, ex.topk_ids, ex.topk_w, ex.lora)
            else:
                ex.out.copy_(ex.dispatch.wait(ex.pending))
                ex.pending = None

    @property
    def segments(self) -> int:
        return sum(isinstance(s, torch.cuda.CUDAGraph) for s in self.steps)
