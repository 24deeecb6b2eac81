"""Incremental detokenization that never emits half a UTF-8 character.

Decodes a short window of recent tokens (prefix_offset..end) and emits only text beyond what the window's first
part (prefix_offset..read_offset) already produced; while the new text ends in U+FFFD (an incomplete byte
sequence) it waits for the next token. Cost per token is O(window), not O(length). A fast (Rust) tokenizer is
called directly (`backend_tokenizer.decode`: what transformers' decode runs without space clean-up, at a fifth of
the cost per call, which adds up to a few percent of a CPU decode step at batch 32).
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-6:])   # a little prompt context for correct spacing
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=self.skip)
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the newly completed text (possibly empty)."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        new = full[len(prefix):]
        # the window slides: what was new becomes the prefix the next call compares against
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += new
        return new

    def flush(self) -> str:
        """At the end: whatever is left, replacement characters included."""
        full = self._decode(self.ids[self.prefix_offset:])
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new = full[len(prefix):] if len(full) > len(prefix) else ""
        self.read_offset = len(self.ids)
        self.text += new
        return new
