"""Examples -> token rows with a loss mask: tokenization, packing or truncation, the train/validation split.

Owns what the model is trained to predict. `mask[i] = 1` means token i is a target (predicted at position i - 1):
the assistant turns of chat records (the chat template's {% generation %} span, which ends with EOS), the
completion (+ EOS) of prompt/completion records, every token of text records. Rows live in one flat array with
offsets (`TokenRows`), cheap to put in Ray's object store once and read by every worker without copies.
With packing, examples are concatenated in order and cut into rows of max_seq_len tokens (the last row may be
shorter); attention then crosses example boundaries, as in most packed SFT. Without it, each example is one row,
truncated to max_seq_len.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymoe.finetune.data import DataError, Example


@dataclass
class TokenRows:
    ids: np.ndarray       # [total] int32
    mask: np.ndarray      # [total] uint8, 1 = target token
    offsets: np.ndarray   # [rows + 1] int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.ids[s:e], self.mask[s:e]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_targets(self) -> int:
        """Target tokens that can be predicted (the first token of a row has no prefix)."""
        return int(self.row_counts()[1].sum())

    def row_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: (tokens, main targets at positions >= 1, MTP targets at positions >= 2), each [rows] int64.
        Every worker can total any batch from these, so normalising the loss needs no communication."""
        starts, lengths = self.offsets[:-1], np.diff(self.offsets)
        csum = np.concatenate([[0], np.cumsum(self.mask, dtype=np.int64)])
        ends = self.offsets[1:]
        main = csum[ends] - csum[np.minimum(starts + 1, ends)]
        mtp = csum[ends] - csum[np.minimum(starts + 2, ends)]
        return lengths.astype(np.int64), main, mtp


@dataclass
class RowStats:
    examples: int
    rows: int
    tokens: int
    targets: int
    truncated: int


def tokenize(example: Example, tok) -> tuple[list[int], list[int]]:
    """(ids, mask) of one example; see the module docstring for what is masked in."""
    r = example.record
    if example.kind == "chat":
        enc = tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), [int(m) for m in enc["assistant_masks"]]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if example.kind == "completion":
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + eos
        return p + c, [0] * len(p) + [1] * len(c)
    ids = tok(r["text"])["input_ids"] + eos
    return ids, [1] * len(ids)


def build_rows(examples: list[Example], tok, max_seq_len: int, packing: bool) -> tuple[TokenRows, RowStats]:
    texts = [e for e in examples if e.kind == "text"]
    encoded_text = iter(tok([e.record["text"] for e in texts])["input_ids"]) if texts else iter(())
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    pieces: list[tuple[list[int], list[int]]] = []
    for ex in examples:
        if ex.kind == "text":                       # batch-encoded above: much faster for large corpora
            ids = next(encoded_text) + eos
            pieces.append((ids, [1] * len(ids)))
        else:
            pieces.append(tokenize(ex, tok))
    truncated = 0
    if packing:
        ids = np.fromiter((t for p, _ in pieces for t in p), dtype=np.int32)
        mask = np.fromiter((m for _, ms in pieces for m in ms), dtype=np.uint8)
        offsets = np.append(np.arange(0, len(ids), max_seq_len, dtype=np.int64), len(ids))
    else:
        rows = []
        for p, m in pieces:
            truncated += len(p) > max_seq_len
            rows.append((p[:max_seq_len], m[:max_seq_len]))
        ids = np.fromiter((t for p, _ in rows for t in p), dtype=np.int32)
        mask = np.fromiter((x for _, m in rows for x in m), dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p, _ in rows])]).astype(np.int64)
    out = TokenRows(ids, mask, offsets)
    return out, RowStats(len(examples), len(out), out.num_tokens, out.num_targets, truncated)


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(fraction * n) examples (at least one) chosen by `seed`; order is kept within each part."""
    if fraction <= 0:
        return examples, []
    n_val = max(1, round(fraction * len(examples)))
    if n_val >= len(examples):
        raise DataError(f"data.validation_fraction {fraction} leaves no training examples out of {len(examples)}")
    held = set(np.random.default_rng(seed).permutation(len(examples))[:n_val].tolist())
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])
