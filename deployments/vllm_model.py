"""VLLMServer: the model deployment when `engine.kind` is `vllm`. Each replica runs vLLM's AsyncLLM (V1) in-process.

It answers the ingress exactly as ModelServer does: `generate(prompt_ids, SamplingParams, request_id)` yields lists
of raymoe Deltas, a bad request raises raymoe's RequestError (checked by the same `check_request` as raymoe's
engine, so both engines refuse the same requests with the same words), and the replica reports an EngineReport to
the MetricsCollector, so the ingress, its errors, API key, metrics names and autoscaling are the same for both
engines. The engine limits come from the same EngineConfig fields (`vllm_engine_args`); what only vLLM has comes
from `engine.vllm.engine_args`. vLLM's pins differ from the project's, so the replica may run in another Python
environment (Ray runtime_env `py_executable`, set by app.py): this module imports vLLM only inside the replica.

LoRA adapters (lora_root, lora_modules, POST /v1/load_lora_adapter) go through vLLM's own LoRA (`enable_lora`, sized
by max_loras / max_lora_rank / max_cpu_loras) behind the same multiplexing as raymoe's replicas (`AdapterHost`):
each name is registered with vLLM as a LoRARequest, and a request on it carries that. Two limits of vLLM 0.32:
- it ignores LoRA on kv_b_proj (its MLA folds that weight into the attention at load), so an adapter that targets
  it is refused (AdapterInvalid, a 400 naming it) rather than served wrong;
- on the CPU it cannot run a mixture-of-experts model with LoRA on: `select_unquantized_moe_backend` then picks its
  Triton MoE kernel, which the CPU build lacks, and every request, base ones too, fails (`module 'triton.language'
  has no attribute 'float32'`). The app refuses that configuration at start (app.app_config). A dense model of the
  same architecture runs (the CI test), and so should an MoE one on GPU nodes, which has not been run here (the lent
  GPU machine has no vLLM).

Not mapped: expert shards (`parallel`: raymoe's engine only), `cpu_compile` (vLLM compiles unless
`enforce_eager`), `quantization: none` (vLLM serves an FP8 checkpoint in FP8), per-request MTP acceptance counts
(vLLM keeps them in its own stats).
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Collection

from ray import serve

from raymoe.deployments.adapter_host import AdapterHost
from raymoe.deployments.adapters import AdapterRef
from raymoe.deployments.metrics import EngineReport
from raymoe.platform.config import EngineConfig, SamplingParams
from raymoe.platform.checkpoint.adapter import read_adapter
from raymoe.platform.checkpoint.reader import CheckpointError
from raymoe.platform.engine import Delta, RequestError, check_request
from raymoe.platform.engine.adapters import AdapterInvalid, AdapterNotFound

log = logging.getLogger(__name__)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)     # the max_lora_rank values vLLM accepts
# weights whose LoRA vLLM drops without a word: its MLA absorbs kv_b_proj into W_UK / W_UV when the model loads
# (seen here: an adapter on kv_b_proj alone gives the base model's tokens, every other attention target matches)
VLLM_ABSORBED = {"kv_b_proj"}


def vllm_engine_args(cfg: EngineConfig, max_context: int, extra: dict | None = None, lora: bool = False) -> dict:
    """AsyncEngineArgs fields from raymoe's EngineConfig. vLLM sizes its KV cache to hold max_model_len, so with a
    fixed `num_blocks` its max_model_len is capped at the cache's tokens (the replica refuses longer requests first,
    with raymoe's message). float32 on the CPU takes vLLM's reference MLA backend: the AMX one it prefers where the
    CPU has AMX refuses float32 weights ("expect weight to be bfloat16, ..."). `lora`: vLLM's LoRA on, sized by the
    same keys as raymoe's adapter pool (max_lora_rank rounded up to a rank vLLM accepts)."""
    cuda = str(cfg.device).startswith("cuda")
    max_len = cfg.max_model_len or max_context
    if cfg.num_blocks:
        max_len = min(max_len, cfg.num_blocks * cfg.block_size)
    args = dict(model=cfg.model, tokenizer=cfg.model, dtype=cfg.dtype or ("bfloat16" if cuda else "float32"),
                seed=cfg.seed, max_model_len=max_len, max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=cfg.max_num_batched_tokens, enable_chunked_prefill=cfg.enable_chunked_prefill,
                enable_prefix_caching=cfg.enable_prefix_caching, block_size=cfg.block_size,
                enforce_eager=cfg.enforce_eager, kv_cache_memory_bytes=int(cfg.kv_cache_memory_gb * 2 ** 30),
                num_gpu_blocks_override=cfg.num_blocks + 1 if cfg.num_blocks else None,   # + vLLM's null block
                disable_log_stats=True)
    if not cuda and args["dtype"] == "float32":
        args["attention_backend"] = "CPU_MLA"   # vLLM's default on AMX machines (AMX_MLA) packs bf16 weights only
    if cfg.quantization == "fp8":
        args["quantization"] = "fp8"            # (auto: vLLM reads the checkpoint's own; none has no vLLM form)
    if cfg.num_speculative_tokens:
        args["speculative_config"] = {"method": "mtp", "num_speculative_tokens": cfg.num_speculative_tokens}
    if cuda and not cfg.enforce_eager:
        args["compilation_config"] = {"cudagraph_capture_sizes": list(cfg.cuda_graph_sizes)}
    if lora:
        rank = next((r for r in VLLM_LORA_RANKS if r >= cfg.max_lora_rank), VLLM_LORA_RANKS[-1])
        args.update(enable_lora=True, max_loras=cfg.max_loras, max_lora_rank=rank,
                    max_cpu_loras=max(cfg.max_loras, cfg.max_cpu_loras))
    return {**args, **(extra or {})}


def vllm_sampling(params: SamplingParams):
    """raymoe's SamplingParams as vLLM's, streaming deltas (RequestOutputKind.DELTA)."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind
    return VSamplingParams(
        n=params.n, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, min_p=params.min_p, seed=params.seed, stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None, ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, logprobs=params.logprobs,
        skip_special_tokens=params.skip_special_tokens, output_kind=RequestOutputKind.DELTA)


def logprob_entries(lps, k: int) -> list[dict]:
    """vLLM's per-token {id: Logprob(logprob, rank)} as raymoe's {"token", "logprob", "top": [(id, lp)] * k}. vLLM
    puts the sampled token first in each position's dict, then the top k (the sampled one once if among them)."""
    out = []
    for pos in lps:
        ranked = sorted(pos.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        tok, lp = next(iter(pos.items()))
        out.append({"token": tok, "logprob": lp.logprob, "top": [(t, v.logprob) for t, v in ranked[:k]]})
    return out


class EngineStats:
    """What vLLM's stat logger last saw, plus counters the replica keeps itself (raymoe's definitions)."""

    def __init__(self) -> None:
        self.running = self.waiting = self.preemptions = 0
        self.kv_cache_usage = 0.0
        self.prefix_cache_queries = self.prefix_cache_hits = 0

    def logger_factory(self):
        """A per-engine vLLM StatLogger factory that writes into this object."""
        from vllm.v1.metrics.loggers import StatLoggerBase
        sink = self

        class _Sink(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    sink.running = scheduler_stats.num_running_reqs
                    sink.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                    sink.kv_cache_usage = scheduler_stats.kv_cache_usage
                if iteration_stats is not None:
                    sink.preemptions += iteration_stats.num_preempted_reqs

            def log_engine_initialized(self) -> None:
                pass

        return lambda vllm_config, engine_index=0: _Sink(vllm_config, engine_index)


@serve.deployment(name="ModelServer")
class VLLMServer(AdapterHost):
    async def __init__(self, engine_config: EngineConfig, metrics=None, metrics_interval_s: float = 1.0,
                       engine_args: dict | None = None, env: dict | None = None, preload: list[AdapterRef] = (),
                       lora: bool = False) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from raymoe.platform.config import ModelConfig
        os.environ.update(env or {})             # read by vLLM at engine start (and by its spawned processes)
        if engine_config.cpu_threads and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{engine_config.cpu_threads - 1}"
        mcfg = ModelConfig.from_pretrained(engine_config.model)
        self.cfg = engine_config
        self.max_model_len = engine_config.max_model_len or mcfg.max_context
        self.vocab_size = mcfg.vocab_size
        self.stats_now = EngineStats()
        args = vllm_engine_args(engine_config, mcfg.max_context, engine_args, lora)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args),
                                                stat_loggers=[self.stats_now.logger_factory()])
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx else "local"
        self.metrics, self.interval = metrics, metrics_interval_s
        self.lora = lora
        self._lora_requests: dict = {}                # adapter name -> vLLM's LoRARequest (its id, its folder)
        self._lora_ids = 0
        self._init_adapters(engine_config.max_loras)
        for ref in preload:                           # lora_modules: on every replica, before it takes requests
            await self.ensure(ref)
        self._reporter = asyncio.create_task(self._report_loop()) if metrics is not None else None

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       adapter: AdapterRef | None = None):
        """Yield lists of Delta: everything vLLM produced for this request since the last yield (one RequestOutput,
        in DELTA mode, carries every choice that moved). Leaving early aborts the request in vLLM."""
        from vllm.inputs import TokensPrompt
        if params.grammar is not None:
            raise RequestError("structured outputs and tools (response_format, structured_outputs, tool_choice "
                               "'required' or named) are served by engine.kind raymoe; the vllm engine does not "
                               "take them yet")
        check_request(prompt_ids, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                      num_blocks=self.cfg.num_blocks, block_size=self.cfg.block_size,
                      num_spec=self.cfg.num_speculative_tokens)
        lora_request = None
        if adapter is not None:
            await self.ensure(adapter)
            lora_request = self._lora_requests[adapter.name]
        done_tokens = [0] * params.n
        first = True
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)),
                                                  vllm_sampling(params), request_id,
                                                  lora_request=lora_request):
                if first:
                    first = False
                    self.stats_now.prefix_cache_queries += params.n
                    self.stats_now.prefix_cache_hits += params.n if out.num_cached_tokens else 0
                batch = []
                for o in out.outputs:
                    done_tokens[o.index] += len(o.token_ids)
                    finish = o.finish_reason if o.finished() else None
                    batch.append(Delta(
                        request_id=request_id, index=o.index, token_ids=list(o.token_ids), text=o.text,
                        finish_reason=finish, prompt_tokens=len(prompt_ids),
                        completion_tokens=done_tokens[o.index],
                        logprobs=logprob_entries(o.logprobs, params.logprobs) if params.logprobs is not None
                        and o.logprobs is not None else None))
                if batch:
                    yield batch
        except ValueError as e:                   # vLLM's own input checks: the request's fault
            raise RequestError(str(e).splitlines()[0]) from None

    # ---- adapters (AdapterHost): vLLM's LoRA, registered under raymoe's names ---------------------------------------
    async def _engine_held(self) -> Collection[str]:
        return self._lora_requests.keys()

    def _engine_held_now(self) -> Collection[str]:
        return self._lora_requests.keys()

    async def _engine_load(self, name: str, path: str) -> dict:
        """Register the adapter with vLLM, which reads and checks it now (add_lora) and again from `path` whenever
        its own cache has dropped it. vLLM's refusal (targets it cannot adapt, a rank above max_lora_rank, shapes of
        another base) is the request's fault: AdapterInvalid, a 400."""
        from vllm.lora.request import LoRARequest
        if not self.lora:
            raise AdapterInvalid("this vLLM replica was started without LoRA (configure lora_root or lora_modules)")
        try:
            adapter = await asyncio.to_thread(read_adapter, path)
        except CheckpointError as e:
            raise AdapterInvalid(f"adapter {name!r}: {e}") from None
        absorbed = sorted({f.module.rsplit(".", 1)[-1] for f in adapter.factors} & VLLM_ABSORBED)
        if absorbed:
            raise AdapterInvalid(f"adapter {name!r} adapts {', '.join(absorbed)}, which vLLM's MLA folds into its "
                                 "attention at load and so would ignore; serve it with engine.kind raymoe")
        self._lora_ids += 1
        req = LoRARequest(lora_name=name, lora_int_id=self._lora_ids, lora_path=path)
        try:
            await self.engine.add_lora(req)
        except Exception as e:                        # noqa: BLE001 - vLLM raises several kinds for a bad adapter
            raise AdapterInvalid(f"adapter {name!r}: vLLM refused it: {str(e).splitlines()[0][:300]}") from None
        self._lora_requests[name] = req
        return {"name": name, "rank": None}

    async def _engine_unload(self, name: str) -> None:
        req = self._lora_requests.pop(name, None)
        if req is None:
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        await self.engine.remove_lora(req.lora_int_id)

    def stats(self) -> dict:
        s = self.stats_now
        return {"running": s.running, "waiting": s.waiting, "kv_cache_usage": s.kv_cache_usage,
                "prefix_cache_queries": s.prefix_cache_queries, "prefix_cache_hits": s.prefix_cache_hits,
                "preemptions": s.preemptions}

    def check_health(self) -> None:
        if self.engine.errored:
            raise RuntimeError("the vLLM engine has failed")

    async def _report_loop(self) -> None:
        while True:
            try:
                await self.metrics.report.remote(EngineReport(replica=self.replica, **self.stats()))
            except Exception as e:             # noqa: BLE001 (metrics never take a replica down)
                log.warning("metrics report failed: %s", e)
            await asyncio.sleep(self.interval)

    def __del__(self) -> None:
        if getattr(self, "_reporter", None) is not None:
            self._reporter.cancel()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
