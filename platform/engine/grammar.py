"""Grammar-constrained decoding with xgrammar: compiling a request's GrammarSpec, one matcher per sequence, and the
batched token-bitmask step the sampler applies to a batch's rows.

`GrammarCache` compiles each distinct spec once (an LRU keyed by the spec's canonical text) against the engine's
tokenizer and vocabulary; the async engine calls it at admission, in a worker thread, so a compile never runs
inside `step()`. `GrammarState` is one sequence's matcher: it advances only with committed tokens (MTP drafts are
tried, then rolled back). Each constrained logits row gets one bitmask row, and `apply_bitmask` masks them all in one
call (xgrammar's kernel; no Python loop over the vocabulary). This module never schedules, samples or sees HTTP.

JSON outputs (schemas, json_object, tool-call arguments) also never take a token holding a raw control character
other than a newline: xgrammar 0.2.9 lets length-bounded JSON strings (`maxLength`) take raw tabs and other C0
characters, which RFC 8259 forbids and strict parsers (json.loads, pydantic) refuse (xgrammar issue #800). Compact
JSON needs none of them, and the tool-call envelope needs only newlines.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import numpy as np
import torch

from raymoe.platform.config import GrammarSpec

JSON_KINDS = ("json_schema", "json_object", "structural_tag")
_CONTROL = set(range(0x20)) - {0x0A}          # C0 characters but the newline


class GrammarError(ValueError):
    """A grammar xgrammar cannot take (an invalid JSON schema, an unsupported regex...): the request's fault."""


_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")      # "[18:39:57] /project/cpp/x.cc:94: " before the message


def _reason(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return _CPP_PREFIX.sub("", lines[0] if lines else type(e).__name__)


class GrammarCache:
    """Compiled grammars of one engine (tokenizer + vocabulary), at most `capacity` of them, least recently used
    out first. Thread-safe: admission threads compile while the engine thread steps."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int], capacity: int = 256, threads: int = 2) -> None:
        import xgrammar as xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        # [ceil(vocab / 32)] int32: the tokens a JSON output may take (no raw control characters; see above)
        ok = np.ones(-(-vocab_size // 32) * 32, dtype=bool)
        for t, b in enumerate(info.decoded_vocab):
            if _CONTROL.intersection(b):
                ok[t] = False
        self.json_tokens = torch.from_numpy(np.packbits(ok, bitorder="little").view(np.int32).copy())
        self._cache: OrderedDict[GrammarSpec, object] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity
        self.hits = self.misses = 0

    def cached(self, spec: GrammarSpec):
        """The compiled grammar if this spec was compiled before, else None (never compiles)."""
        with self._lock:
            g = self._cache.get(spec)
            if g is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
            return g

    def compile(self, spec: GrammarSpec):
        """The spec's compiled grammar (xgrammar CompiledGrammar), compiled now if not cached. GrammarError when
        xgrammar refuses it."""
        g = self.cached(spec)
        if g is not None:
            return g
        try:
            g = self._compile(spec)
        except GrammarError:
            raise
        except Exception as e:                 # noqa: BLE001 (xgrammar raises RuntimeError/ValueError/its own)
            raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: {_reason(e)}") from None
        with self._lock:
            self.misses += 1
            self._cache[spec] = g
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return g

    def _compile(self, spec: GrammarSpec):
        c = self._compiler
        if spec.kind == "json_schema":
            return c.compile_json_schema(spec.value, any_whitespace=False, strict_mode=spec.strict)
        if spec.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "regex":
            return c.compile_regex(spec.value)
        if spec.kind == "choice":
            choices = json.loads(spec.value)
            if not choices:
                raise GrammarError("invalid choice: the list of choices is empty")
            # EBNF string literals take JSON's escapes
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(x, ensure_ascii=False) for x in choices))
        if spec.kind == "ebnf":
            return c.compile_grammar(spec.value)
        return c.compile_structural_tag(spec.value)


class GrammarState:
    """One sequence's position in its grammar. Advanced with committed tokens only. `allowed`: a bitmask row that
    further limits every fill (GrammarCache.json_tokens for JSON outputs), or None."""

    def __init__(self, compiled, allowed: torch.Tensor | None = None) -> None:
        import xgrammar as xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.allowed = allowed

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def accept(self, tokens: list[int]) -> int:
        """Advance over tokens; stop at the first the grammar refuses. Returns how many were accepted."""
        for n, t in enumerate(tokens):
            if not self.matcher.accept_token(t):
                return n
        return len(tokens)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into bitmask[row]."""
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.allowed is not None:
            bitmask[row] &= self.allowed

    def rollback(self, n: int) -> None:
        if n:
            self.matcher.rollback(n)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32, every token allowed (a row no grammar fills masks nothing)."""
    import xgrammar as xgr
    return xgr.allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    # logits: [R, V] in place; bitmask: [R, ceil(V / 32)]; only `rows` are masked (one call for the whole batch)
    import xgrammar as xgr
    if rows:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
