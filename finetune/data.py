"""Read finetuning datasets: JSONL files, local or remote, into validated examples.

Owns the record formats and their checks. A record is one of
  chat        {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}  (>= 1 assistant turn)
  completion  {"prompt": str, "completion": str}
  text        {"text": str}                                   (every token is a target; for pretraining-style data)
Every problem is reported as `file:line: what is wrong`; with `on_bad_line="skip"` bad lines are counted and
dropped instead. Remote paths (s3://, gs://, file://, ...) open through fsspec, or pyarrow.fs when fsspec is
absent. It never tokenizes (finetune.tokens does).
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Kind = Literal["chat", "completion", "text"]
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class Example:
    kind: Kind
    record: dict
    source: str          # "file:line"


def _open_text(path: str) -> io.TextIOBase:
    if "://" not in path:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{path}: dataset file not found")
        return p.open("r", encoding="utf-8")
    try:
        import fsspec
    except ImportError:
        fsspec = None
    try:
        if fsspec is not None:
            return fsspec.open(path, "rt", encoding="utf-8").open()
        import pyarrow.fs as pafs
        fs, inner = pafs.FileSystem.from_uri(path)
        return io.TextIOWrapper(fs.open_input_stream(inner), encoding="utf-8")
    except ImportError as e:
        raise DataError(f"{path}: reading remote datasets needs fsspec or pyarrow ({e})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: dataset file not found") from None
    except Exception as e:  # noqa: BLE001 (any filesystem error becomes one line)
        raise DataError(f"{path}: cannot open ({type(e).__name__}: {e})") from None


def classify(record: object) -> Kind:
    """The record's kind, or ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{'role': one of {'/'.join(ROLES)}, 'content': str}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("no assistant message (nothing to learn from)")
        return "chat"
    if "prompt" in record or "completion" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            raise ValueError("'prompt' and 'completion' must both be strings")
        if not record["completion"]:
            raise ValueError("'completion' is empty")
        return "completion"
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError("'text' must be a non-empty string")
        return "text"
    raise ValueError(f"unknown record shape with keys {sorted(record)[:6]}: expected 'messages', "
                     "'prompt'+'completion' or 'text'")


def read_jsonl(path: str, on_bad_line: Literal["error", "skip"] = "error") -> list[Example]:
    out: list[Example] = []
    skipped = 0
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
                kind = classify(record)
            except json.JSONDecodeError as e:
                problem = f"invalid JSON ({e.msg} at column {e.colno})"
            except ValueError as e:
                problem = str(e)
            else:
                out.append(Example(kind, record, where))
                continue
            if on_bad_line == "error":
                raise DataError(f"{where}: {problem}")
            skipped += 1
            log.warning("%s: skipped: %s", where, problem)
    if skipped:
        log.warning("%s: skipped %d malformed line(s)", path, skipped)
    return out


def load_examples(paths: list[str], on_bad_line: Literal["error", "skip"] = "error",
                  what: str = "data.train") -> list[Example]:
    """All examples of `paths` in order; DataError if any file is missing or none holds an example."""
    examples: list[Example] = []
    for p in paths:
        examples.extend(read_jsonl(p, on_bad_line))
    if not examples:
        raise DataError(f"{what}: {', '.join(paths)}: no examples (empty dataset)")
    return examples
