"""Deterministic token-id prompts shared by every peer of the CPU decode benchmark.

    python benchmarks/peers/prompts.py --model /tmp/vllm-tiny --out /tmp/prompts.json [--n 32 --seed 0]

Each prompt is BOS followed by tokens drawn uniformly (seeded ``random.Random``) from the tokenizer's
ordinary vocabulary: special/added tokens (BOS, EOS, pad, chat markers) are never drawn. Lengths are drawn
uniformly in [min_len, max_len] (BOS included). Only the standard library is used, so the file runs under
any of the benchmark's interpreters (project venv, vLLM venv) and gives the same prompts in each.

Output JSON: {"model": DIR, "seed": S, "min_len": A, "max_len": B, "bos_token_id": ..., "prompts": [[ids], ...]}.
A peer that runs concurrency c takes the first c prompts (cycling if c > n).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def ordinary_token_ids(model_dir: str | Path) -> tuple[list[int], int | None]:
    """Ids of the tokenizer's non-special vocabulary (those below config.vocab_size), and the BOS id."""
    model_dir = Path(model_dir)
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    special = {t["id"] for t in tok.get("added_tokens", [])}
    vocab_size = int(cfg["vocab_size"])
    ids = sorted({i for i in tok["model"]["vocab"].values() if i not in special and i < vocab_size})
    if not ids:
        raise ValueError(f"{model_dir}: tokenizer has no ordinary tokens")
    return ids, cfg.get("bos_token_id")


def make_prompts(model_dir: str | Path, n: int = 32, min_len: int = 16, max_len: int = 64,
                 seed: int = 0) -> dict:
    if not 2 <= min_len <= max_len:
        raise ValueError("need 2 <= min_len <= max_len")
    ids, bos = ordinary_token_ids(model_dir)
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        body = [rng.choice(ids) for _ in range(length - (bos is not None))]
        prompts.append(([bos] if bos is not None else []) + body)
    return {"model": str(model_dir), "seed": seed, "min_len": min_len, "max_len": max_len,
            "bos_token_id": bos, "prompts": prompts}


def load_prompts(path: str | Path) -> list[list[int]]:
    return [list(map(int, p)) for p in json.loads(Path(path).read_text())["prompts"]]


def take(prompts: list[list[int]], c: int) -> list[list[int]]:
    """The first c prompts, cycling when c exceeds the number of prompts."""
    return [prompts[i % len(prompts)] for i in range(c)]


def parse_concurrency(text: str) -> list[int]:
    values = [int(x) for x in text.replace(" ", "").split(",") if x]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"bad concurrency list {text!r} (want e.g. 1,8,32)")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (tokenizer.json + config.json)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    data = make_prompts(a.model, a.n, a.min_len, a.max_len, a.seed)
    Path(a.out).write_text(json.dumps(data))
    lens = [len(p) for p in data["prompts"]]
    print(f"{a.out}: {len(lens)} prompts, lengths {min(lens)}..{max(lens)} (total {sum(lens)} tokens)")


if __name__ == "__main__":
    main()
