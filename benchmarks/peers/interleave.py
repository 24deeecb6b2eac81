"""The line protocol between the CPU decode benchmark's driver (benchmarks/cpu_decode.py) and one engine process.

Every engine under test (raymoe in one configuration, transformers, vLLM) runs in its own process, loads once,
and then answers requests on stdin, one JSON object a line, with one JSON object a line on its (real) stdout:

    {"op": "run", "c": 8, "max_tokens": 64}  ->  {"seconds": 1.23, "tokens": [[...], ...]}
    {"op": "quit"}                           ->  (the process exits)

"run" generates greedily for the first c prompts of the prompt file (prompts.take) as one batch and times the
call (time.perf_counter around it). The driver asks each engine in turn, round after round, so every engine's
timed runs are spread over the same minutes and share whatever else loads the machine at the time.

Anything the engine libraries print goes to stderr: `answer_channel()` moves the process's stdout there and
keeps a private copy of the real stdout for the answers.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

from prompts import take


def answer_channel() -> int:
    """Redirect fd 1 to stderr and return a descriptor of the original stdout, for the answers only."""
    fd = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    return fd


def serve(generate: Callable[[list[list[int]], int], list[list[int]]], prompts: list[list[int]], fd: int) -> None:
    """Answer the driver's requests until "quit" or end of input. `generate(batch, n)` returns each prompt's n
    greedy token ids."""
    ready = json.dumps({"ready": True}) + "\n"
    os.write(fd, ready.encode())
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        batch = take(prompts, req["c"])
        t = time.perf_counter()
        tokens = generate(batch, req["max_tokens"])
        dt = time.perf_counter() - t
        os.write(fd, (json.dumps({"seconds": dt, "tokens": tokens}) + "\n").encode())
