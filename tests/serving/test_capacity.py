"""Over capacity: with room for one running and one queued request, the rest get 429 with Retry-After at once;
none hangs, and every accepted request completes. A client that disconnects mid-stream frees its KV blocks."""
from __future__ import annotations

import asyncio

from serve_helpers import TIGHT_KEY, burst, check_disconnect_frees_kv, check_over_capacity


def test_over_capacity_gets_429_at_once(tight):
    headers = {"authorization": f"Bearer {TIGHT_KEY}"}
    check_over_capacity(asyncio.run(burst(tight.url, headers, 6)))


def test_disconnect_mid_stream_frees_kv_blocks(served):
    check_disconnect_frees_kv(served.url, served.name)
