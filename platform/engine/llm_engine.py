"""LLMEngine: the synchronous heart of inference. add_request / step / abort, plus `generate` for scripts.

One `step()` schedules a batch (continuous batching, chunked prefill), runs the model over the paged latent cache,
samples or verifies MTP drafts, drafts the next tokens with the MTP module, detokenizes incrementally, applies stop
conditions and returns per-sequence deltas. Validation happens in `add_request`, before any work; so does compiling
a request's grammar (grammar.py), which step() only applies (bitmasks) and advances (committed tokens).
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import torch

from raymoe.platform.config import EngineConfig, GrammarSpec, SamplingParams
from raymoe.platform.engine.adapters import AdapterPool
from raymoe.platform.engine.block_manager import BlockManager
from raymoe.platform.engine.detokenizer import IncrementalDetokenizer
from raymoe.platform.engine.grammar import (JSON_KINDS, GrammarCache, GrammarError, GrammarState, allocate_bitmask,
                                            apply_bitmask)
from raymoe.platform.engine.model_runner import ModelRunner
from raymoe.platform.engine.sampler import (accept_greedy, apply_penalties, draw, needs_penalties, processed_probs,
                                            top_logprobs, verify_drafts)
from raymoe.platform.engine.scheduler import Scheduled, Scheduler
from raymoe.platform.engine.sequence import Sequence, Status


class RequestError(ValueError):
    """A request the engine refuses before doing any work (too long, bad ids, duplicate id...)."""


def check_request(prompt_ids: list[int], params: SamplingParams, *, vocab_size: int, max_model_len: int,
                  num_blocks: int | None, block_size: int, num_spec: int = 0) -> None:
    """Refuse a request that can never run (empty, ids outside the vocabulary, longer than the context or the KV
    cache), with the engine's wording. Every engine behind the serving app checks requests with this one function."""
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    total = len(prompt_ids) + params.max_tokens
    if total > max_model_len:
        raise RequestError(f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) is "
                           f"{total} tokens, more than max_model_len ({max_model_len})")
    if num_blocks is not None and -(-(total + num_spec) // block_size) > num_blocks:
        raise RequestError(f"prompt plus max_tokens ({total} tokens) does not fit in the KV cache "
                           f"({num_blocks} blocks of {block_size})")


@dataclass
class Delta:
    """What one sequence produced in one step."""
    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None
    spec_proposed: int = 0
    spec_accepted: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _adapters_of(seqs) -> list[str]:
    """The adapter names of a scheduler queue (the engine's thread only)."""
    return sorted({s.params.adapter for s in seqs if s.params.adapter})


@dataclass
class _Out:
    """Per-sequence output state kept by the engine (detokenizer, stop-string holdback)."""
    detok: IncrementalDetokenizer | None
    emitted_chars: int = 0


def _dtype(cfg: EngineConfig) -> torch.dtype:
    if cfg.dtype is not None:
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if str(cfg.device).startswith("cuda") else torch.float32


class LLMEngine:
    def __init__(self, cfg: EngineConfig, model=None, tokenizer=None, placement_group=None) -> None:
        # placement_group: the replica's group whose bundles 1..N take the expert shards (None: the current one,
        # or a new one); only with cfg.parallel.num_shards
        from raymoe.platform.model import from_pretrained
        self.cfg = cfg
        if cfg.cpu_threads is not None and not str(cfg.device).startswith("cuda"):
            torch.set_num_threads(cfg.cpu_threads)
        sharded = cfg.parallel.num_shards > 0
        self.model = model if model is not None else from_pretrained(
            cfg.model, dtype=_dtype(cfg), device=cfg.device, experts_range=(0, 0) if sharded else None,
            load_format=cfg.load_format, seed=cfg.seed, quantization=cfg.quantization)
        self.ep = None                   # the expert shards (raymoe.platform.parallel), when the experts are remote
        if sharded:
            from raymoe.platform.parallel.expert_parallel import ExpertParallel
            self.ep = ExpertParallel(cfg.model, self.model, cfg.parallel, placement_group, cfg.max_loras,
                                     cfg.max_lora_rank, cfg.quantization)
        for moe in self.model.moe_layers():
            if moe.expert_load is None:
                moe.count_load()         # tokens per expert per layer, summed on the device (expert_load())
        mcfg = self.model.config
        self.vocab_size = mcfg.vocab_size
        self.max_model_len = cfg.max_model_len or mcfg.max_context
        if self.max_model_len > mcfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{mcfg.max_position_embeddings}")
        self.num_spec = cfg.num_speculative_tokens
        if self.num_spec and not len(self.model.mtp):
            raise ValueError(f"num_speculative_tokens > 0 needs a checkpoint with an MTP module, but {cfg.model} has "
                             "no MTP weights (num_nextn_predict_layers 0, or its MTP layer was not saved); run "
                             "without speculation")
        dtype = next(self.model.parameters()).dtype
        per_block = ModelRunner.cache_bytes_per_block(self.model, cfg.block_size, self.num_spec > 0, dtype)
        num_blocks = cfg.num_blocks or max(1, int(cfg.kv_cache_memory_gb * 2 ** 30 // per_block))
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.adapter_pool = AdapterPool(self.model, cfg.max_loras, cfg.max_cpu_loras, cfg.max_lora_rank, self.ep)
        self.scheduler = Scheduler(cfg, self.blocks, self.adapter_pool)
        self._lock = threading.RLock()   # a step, a load and an unload never interleave (servers call from threads)
        self.runner = ModelRunner(self.model, num_blocks, cfg.block_size, self.num_spec > 0,
                                  None if cfg.enforce_eager else cfg.cuda_graph_sizes, self.max_model_len,
                                  {1, self.num_spec + 1} if cfg.cpu_compile and not cfg.enforce_eager else None,
                                  {1, self.num_spec + 1}, piecewise_graphs=cfg.parallel.piecewise_graphs)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        if tokenizer is None and (Path(cfg.model) / "tokenizer.json").is_file():
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.tokenizer = tokenizer
        eos = mcfg.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.requests: dict[str, list[Sequence]] = {}
        self.outs: dict[int, _Out] = {}
        self._grammars: GrammarCache | None = None       # built at the first constrained request
        self._grammars_lock = threading.Lock()
        self._gen_times: deque[tuple[float, int]] = deque()
        self.total_generated = 0

    # ---- requests ------------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams | None = None,
                    grammar=None) -> None:
        """grammar: params.grammar compiled already (the async engine compiles at admission); None compiles here."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        self.validate(prompt_ids, params)
        if params.grammar is not None and grammar is None:
            grammar = self.compile_grammar(params.grammar)
        seqs = [Sequence(request_id, prompt_ids, params, i) for i in range(params.n)]
        if params.adapter is not None:
            with self._lock:
                for s in seqs:
                    s.adapter_key = self.adapter_pool.use(params.adapter)
        self.requests[request_id] = seqs
        for s in seqs:
            if params.grammar is not None:
                s.grammar = GrammarState(grammar, self._grammars.json_tokens if params.grammar.kind in JSON_KINDS
                                         else None)
            detok = None if self.tokenizer is None else IncrementalDetokenizer(
                self.tokenizer, prompt_ids, params.skip_special_tokens)
            self.outs[s.seq_id] = _Out(detok)
            self.scheduler.add(s)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse, before any work, a request that can never run. Reads only immutable engine facts."""
        if params.adapter is not None:
            self.adapter_pool.key(params.adapter)        # AdapterNotFound for a name that is not loaded
        check_request(prompt_ids, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                      num_blocks=self.blocks.num_blocks, block_size=self.cfg.block_size, num_spec=self.num_spec)
        if params.grammar is not None and self.tokenizer is None:
            raise RequestError("constrained decoding needs the model's tokenizer, and this engine has none")

    # ---- grammars ------------------------------------------------------------------------------------------------
    def cached_grammar(self, spec: GrammarSpec):
        """The compiled grammar when this spec was compiled before (no work), else None."""
        return None if self._grammars is None else self._grammars.cached(spec)

    def compile_grammar(self, spec: GrammarSpec):
        """Compile (or fetch from the cache) a request's grammar. RequestError when xgrammar refuses it. Callers
        compile at admission, off the engine thread when they can; step() never compiles."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCache(self.tokenizer, self.vocab_size, self.eos_ids)
        try:
            return self._grammars.compile(spec)
        except GrammarError as e:
            raise RequestError(str(e)) from None

    def abort(self, request_id: str) -> None:
        for s in self.requests.pop(request_id, []):
            if not s.is_finished:
                self.scheduler.abort(s)
                self._adapter_done(s)
            self.outs.pop(s.seq_id, None)

    def _adapter_done(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.adapter_pool.done(seq.adapter)

    # ---- adapters ------------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> dict:
        """Load the PEFT LoRA adapter at `path` as `name` for requests to ask for (SamplingParams.adapter);
        checked against the base model (AdapterInvalid). Returns {"name", "rank", "targets"}. Running requests
        are not touched."""
        with self._lock:
            return self.adapter_pool.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Unload `name` (AdapterNotFound if it is not loaded); requests already using it finish with it."""
        with self._lock:
            self.adapter_pool.unload(name)

    def adapters(self) -> list[str]:
        return self.adapter_pool.names()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ------------------------------------------------------------------------------------------------
    def step(self) -> list[Delta]:
        with self._lock:
            if self.ep is None:
                return self._step()
            with self.ep.stepping():             # a step never mixes two placement plans
                return self._step()

    def _step(self) -> list[Delta]:
        sched = self.scheduler.schedule()
        if not sched:
            return []
        starts = [s.seq.num_computed_tokens for s in sched]
        tables = [s.seq.block_table for s in sched]
        inputs = [(s.seq.token_ids + s.seq.draft_ids)[st:st + s.num_tokens] for s, st in zip(sched, starts)]
        lora = [s.seq.lora_slot for s in sched]
        hidden = self.runner.forward(inputs, tables, starts, lora if max(lora) >= 0 else None)
        offsets = [0]
        for s in sched:
            offsets.append(offsets[-1] + s.num_tokens)

        new_tokens: dict[int, list[int]] = {}
        new_logprobs: dict[int, list[dict]] = {}
        valid = [s.num_tokens for s in sched]             # positions whose latents stay valid
        ending = [i for i, s in enumerate(sched) if s.reaches_end]
        if ending:
            rows, owners = [], []
            for i in ending:
                s = sched[i]
                first = offsets[i] + s.num_tokens - 1 - s.num_drafts
                for j in range(s.num_drafts + 1):
                    rows.append(first + j)
                    owners.append((i, j))
            logits = self.runner.logits(hidden[rows])
            params = [sched[i].seq.params for i, _ in owners]
            if needs_penalties(params):
                prompts = [sched[i].seq.token_ids for i, _ in owners]
                counts = [sched[i].seq.output_counts + Counter(sched[i].seq.draft_ids[:j]) for i, j in owners]
                logits = apply_penalties(logits, params, prompts, counts)
            raw, tried = logits, {}                      # logprobs report the unconstrained distribution
            if any(sched[i].seq.grammar is not None for i in ending):
                if any(p.logprobs is not None for p in params):
                    raw = logits.clone()
                tried = self._mask_grammars(sched, ending, logits)
            best = logits.argmax(-1).tolist()            # greedy choices of every row: one device sync per step
            probs = None if all(p.greedy for p in params) else processed_probs(logits, params)
            r = 0
            for i in ending:
                s = sched[i]
                seq, k = s.seq, s.num_drafts
                if k:
                    toks = (accept_greedy(seq.draft_ids[:k], best[r:r + k + 1]) if seq.params.greedy else
                            verify_drafts(probs[r:r + k + 1], seq.draft_ids[:k], seq.draft_probs, seq.generator,
                                          self.generator))
                    seq.spec_proposed += k
                    seq.spec_accepted += len(toks) - 1
                elif seq.params.greedy:
                    toks = [best[r]]
                else:
                    toks = draw(probs[r:r + 1], [seq.generator], self.generator)
                lp = top_logprobs(raw[r:r + len(toks)], toks, [seq.params.logprobs] * len(toks))
                valid[i] = s.num_tokens - k + len(toks) - 1
                seq.num_computed_tokens = len(seq) + len(toks) - 1
                seq.draft_ids, seq.draft_probs = [], None
                new_tokens[i], new_logprobs[i] = self._append(seq, toks, lp)
                if seq.grammar is not None:
                    self._advance_grammar(seq, tried[i], new_tokens[i])
                r += k + 1
        for i, s in enumerate(sched):
            if i not in new_tokens:
                s.seq.num_computed_tokens += s.num_tokens
            self.blocks.commit_full_blocks(s.seq)
        if self.num_spec:
            self._draft(sched, starts, hidden, offsets, valid)
        deltas = [d for i, s in enumerate(sched) if (d := self._delta(s.seq, new_tokens.get(i, []),
                                                                       new_logprobs.get(i, []))) is not None]
        for seq in self.scheduler.remove_finished():
            self._adapter_done(seq)
            self.outs.pop(seq.seq_id, None)
            reqs = self.requests.get(seq.request_id)
            if reqs is not None and all(x.is_finished for x in reqs):
                del self.requests[seq.request_id]
        return deltas

    def _mask_grammars(self, sched: list[Scheduled], ending: list[int], logits: torch.Tensor) -> dict[int, int]:
        """Mask, in place, every logits row of a constrained sequence with the tokens its grammar allows there: one
        bitmask for the batch, applied in one call. A sequence with k drafts has k + 1 rows; its matcher tries the
        drafts in order to mask the row after each, and stops at the first draft the grammar refuses (the rows
        after it stay unmasked: verification rejects that draft, as its row allows only legal tokens, so they are
        never read). Returns, per sched index, how many drafts each matcher took, to roll back once verified."""
        bitmask = allocate_bitmask(logits.shape[0], logits.shape[1])
        rows: list[int] = []
        tried: dict[int, int] = {}
        r = 0
        for i in ending:
            s = sched[i]
            g, k = s.seq.grammar, s.num_drafts
            if g is not None:
                taken = 0
                for j in range(k + 1):
                    g.fill(bitmask, r + j)
                    rows.append(r + j)
                    if j == k or not g.matcher.accept_token(s.seq.draft_ids[j]):
                        break
                    taken += 1
                tried[i] = taken
            r += k + 1
        apply_bitmask(logits, bitmask, rows)
        return tried

    def _advance_grammar(self, seq: Sequence, tried: int, toks: list[int]) -> None:
        """Undo the drafts the matcher tried, advance it with the tokens committed; a grammar that is complete
        ends the sequence (its stop token was taken, or nothing more can follow)."""
        g = seq.grammar
        g.rollback(tried)
        if g.accept(toks) < len(toks) or (g.terminated and not seq.is_finished):
            seq.finish_reason, seq.status = seq.finish_reason or "stop", Status.FINISHED

    def _append(self, seq: Sequence, toks: list[int], lp: list) -> tuple[list[int], list[dict]]:
        """Append sampled tokens, stopping at the first finishing one."""
        taken, taken_lp = [], []
        p = seq.params
        for t, l in zip(toks, lp):
            seq.append(t)
            taken.append(t)
            if l is not None:
                taken_lp.append(l)
            self.total_generated += 1
            if (t in self.eos_ids and not p.ignore_eos) or t in p.stop_token_ids:
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
                seq.finish_reason = "length"
            if seq.finish_reason:
                seq.status = Status.FINISHED
                break
        self._gen_times.append((time.perf_counter(), len(taken)))
        return taken, taken_lp

    def _draft(self, sched: list[Scheduled], starts: list[int], hidden: torch.Tensor, offsets: list[int],
               valid: list[int]) -> None:
        """Run the MTP module over this step's valid positions; draft for sequences that reached their end."""
        idx = [i for i, s in enumerate(sched) if not s.seq.is_finished and valid[i] > 0]
        if not idx:
            return
        # After a verification step every sequence computed k + 1 positions, of which valid[i] hold. With captured
        # or compiled steps, run the MTP module over all k + 1 (the extra rows write latents past the sequence's
        # end, which the next step overwrites before anything reads them) so the batch stays uniform.
        q = self.num_spec + 1
        span = ({i: q for i in idx} if self.runner.uniform is not None and
                all(sched[i].num_tokens == q and sched[i].reaches_end for i in idx) else {i: valid[i] for i in idx})
        rows = torch.cat([torch.arange(offsets[i], offsets[i] + span[i]) for i in idx]).to(hidden.device)
        nxt = []
        for i in idx:
            known = sched[i].seq.token_ids[starts[i] + 1:starts[i] + valid[i] + 1]
            nxt.append(known + [known[-1]] * (span[i] - len(known)))
        h = self.runner.mtp(hidden[rows], nxt, [sched[i].seq.block_table for i in idx], [starts[i] for i in idx])
        ends = [j for j, i in enumerate(idx) if sched[i].reaches_end]
        if not ends:
            return
        last_rows, pos = [], []
        acc = 0
        for j, i in enumerate(idx):
            if j in ends:
                last_rows.append(acc + valid[i] - 1)
                pos.append(starts[i] + valid[i] - 1)
            acc += span[i]
        seqs = [sched[idx[j]].seq for j in ends]
        h_last = h[last_rows]
        for step in range(self.num_spec):
            keep = [b for b, s in enumerate(seqs) if len(s) + len(s.draft_ids) < self.max_model_len and
                    self.blocks.ensure(s, len(s) + len(s.draft_ids) + 1)]
            if not keep:
                return
            seqs, h_last, pos = [seqs[b] for b in keep], h_last[keep], [pos[b] for b in keep]
            logits = self.runner.logits(h_last)
            params = [s.params for s in seqs]
            best = logits.argmax(-1).tolist()
            probs = None if all(p.greedy for p in params) else processed_probs(logits, params)
            for b, s in enumerate(seqs):
                d = best[b] if s.params.greedy else draw(probs[b:b + 1], [s.generator], self.generator)[0]
                s.draft_ids.append(d)
                if not s.params.greedy:
                    s.draft_probs = probs[b:b + 1] if s.draft_probs is None else torch.cat([s.draft_probs,
                                                                                            probs[b:b + 1]])
            if step + 1 == self.num_spec:
                return
            pos = [p + 1 for p in pos]
            h_last = self.runner.mtp(h_last, [[s.draft_ids[-1]] for s in seqs], [s.block_table for s in seqs], pos)

    def _delta(self, seq: Sequence, toks: list[int], lp: list[dict]) -> Delta | None:
        out = self.outs.get(seq.seq_id)
        if out is None or (not toks and not seq.is_finished):
            return None
        text = ""
        p = seq.params
        if out.detok is not None:
            # token by token: a stop string completed inside an accepted MTP run ends the output at the token that
            # completed it, as without drafts (the tokens after it are dropped)
            for n in range(max(len(toks), 1)):
                out.detok.push(toks[n:n + 1])
                if seq.is_finished and n + 1 >= len(toks):
                    out.detok.flush()
                full = out.detok.text
                at = min((a for stop in p.stop        # text already emitted never contains a stop string (holdback)
                          if (a := full.find(stop, max(0, out.emitted_chars - len(stop) + 1))) >= 0), default=-1)
                if at >= 0:
                    full = full[:at]
                    extra = len(toks) - n - 1
                    seq.drop_last(extra)
                    self.total_generated -= extra
                    toks, lp = toks[:n + 1], lp[:n + 1]
                    seq.finish_reason, seq.status = "stop", Status.FINISHED
                    break
            hold = 0 if seq.is_finished else max((len(s) - 1 for s in p.stop), default=0)
            upto = max(out.emitted_chars, len(full) - hold)
            text = full[out.emitted_chars:upto]
            out.emitted_chars = upto
        return Delta(seq.request_id, seq.index, toks, text, seq.finish_reason, seq.num_prompt_tokens,
                     seq.num_output_tokens, lp or None, seq.spec_proposed, seq.spec_accepted)

    # ---- conveniences --------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[dict]:
        """Run prompts to completion (sync). Returns per request: {"outputs": [{token_ids, text, finish_reason}]}."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        acc = {rid: {} for rid in ids}
        for rid, pr, pa in zip(ids, prompts, plist):
            self.add_request(rid, pr, pa)
        while self.has_unfinished():
            for d in self.step():
                o = acc[d.request_id].setdefault(d.index, {"token_ids": [], "text": "", "finish_reason": None,
                                                           "logprobs": []})
                o["token_ids"] += d.token_ids
                o["text"] += d.text
                o["finish_reason"] = d.finish_reason
                o["logprobs"] += d.logprobs or []
                o["spec"] = (d.spec_proposed, d.spec_accepted)
        return [{"outputs": [acc[r][i] for i in sorted(acc[r])]} for r in ids]

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert of each MoE layer since the engine started (one host sync, when asked)."""
        moes = [m for m in self.model.moe_layers() if m.expert_load is not None]
        counts = torch.stack([m.expert_load for m in moes]).tolist() if moes else []
        return {m.layer: c for m, c in zip(moes, counts)}

    def expert_balance(self):
        """Max/mean load per MoE layer over experts and over shards (the active plan's; one shard without expert
        parallelism), from expert_load(): a `BalanceReport` with a printable table()."""
        from raymoe.platform.parallel.plan import PlacementPlan
        loads = self.expert_load()
        plan = (self.ep.plan if self.ep is not None else
                PlacementPlan.contiguous(1, list(loads), self.model.config.n_routed_experts))
        return plan.balance_report(loads)

    def close(self) -> None:
        """Stop the expert shards, if any (the engine is unusable afterwards)."""
        if self.ep is not None:
            self.ep.close()
            self.ep = None

    def stats(self) -> dict:
        now = time.perf_counter()
        while self._gen_times and now - self._gen_times[0][0] > 10:
            self._gen_times.popleft()
        span = now - self._gen_times[0][0] if len(self._gen_times) > 1 else 0
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_cache_usage": round(self.blocks.usage, 4), "num_blocks": self.blocks.num_blocks,
                "prefix_cache_hits": self.blocks.prefix_hits, "prefix_cache_queries": self.blocks.prefix_queries,
                "preemptions": self.scheduler.num_preemptions,
                "running_adapters": _adapters_of(self.scheduler.running),
                "waiting_adapters": _adapters_of(self.scheduler.waiting),
                "generation_tokens_per_s": round(sum(n for _, n in self._gen_times) / span, 2) if span else 0.0,
                "total_generated_tokens": self.total_generated, "adapters": self.adapter_pool.stats()}
