"""MLA: the naive, absorbed and paged-cache paths agree; the cache holds 576-wide latents at full size."""
from __future__ import annotations

import torch

from raymoe.platform.model import PagedAttention, from_pretrained


def test_naive_equals_absorbed(tiny_ckpt_fp32):
    m = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = m(ids, path="naive"), m(ids, path="absorbed")
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


def _paged_meta(seq_lens, query_lens, block_size, num_blocks, gen):
    """Random (shuffled) block tables, as a real allocator would leave them."""
    perm = torch.randperm(num_blocks, generator=gen)
    tables, slots, used = [], [], 0
    width = max(-(-L // block_size) for L in seq_lens)
    for L, q in zip(seq_lens, query_lens):
        n = -(-L // block_size)
        blocks = perm[used:used + n]
        used += n
        tables.append(torch.cat([blocks, torch.zeros(width - n, dtype=torch.long)]))
        for p in range(L - q, L):
            slots.append(int(blocks[p // block_size]) * block_size + p % block_size)
    qs = [0]
    for q in query_lens:
        qs.append(qs[-1] + q)
    return PagedAttention(slot_mapping=torch.tensor(slots), block_tables=torch.stack(tables), query_start=qs,
                          seq_lens=list(seq_lens), block_size=block_size)


def test_paged_prefill_then_decode_matches_full_forward(tiny_ckpt_fp32):
    """Prefill two sequences in chunks, then decode both together; logits equal the no-cache forward."""
    m = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32)
    cfg, bs, nb = m.config, 4, 64
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1000, (n,), generator=gen) for n in (13, 22)]
    caches = [torch.zeros(nb, bs, cfg.latent_dim) for _ in range(m.num_cache_layers)]
    perm = torch.randperm(nb, generator=gen)
    tables = [perm[:8], perm[8:16]]

    def meta(lens, qlens):
        slots = []
        for b, (L, q) in enumerate(zip(lens, qlens)):
            slots += [int(tables[b][p // bs]) * bs + p % bs for p in range(L - q, L)]
        qs = [0]
        for q in qlens:
            qs.append(qs[-1] + q)
        return PagedAttention(slot_mapping=torch.tensor(slots, dtype=torch.long),
                              block_tables=torch.stack(tables), query_start=qs, seq_lens=list(lens), block_size=bs)

    got = {0: [], 1: []}
    with torch.no_grad():
        # chunk 1: seq0[0:7], seq1[0:10]; chunk 2: seq0[7:12], seq1[10:21]; then decode the last tokens together
        done = [0, 0]
        for cut in ([7, 10], [12, 21], [13, 22]):
            ids = torch.cat([seqs[b][done[b]:cut[b]] for b in range(2)])
            pos = torch.cat([torch.arange(done[b], cut[b]) for b in range(2)])
            h = m.forward_cached(ids, pos, caches, meta(cut, [cut[b] - done[b] for b in range(2)]))
            logits = m.compute_logits(h)
            off = 0
            for b in range(2):
                n = cut[b] - done[b]
                got[b].append(logits[off:off + n])
                off += n
            done = list(cut)
        for b in range(2):
            ref = m(seqs[b][None])[0]
            out = torch.cat(got[b])
            assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_decode_path_batches_mixed_lengths(tiny_ckpt_fp32):
    from raymoe.platform.model.attention import causal_latent_attention, paged_latent_attention
    gen = torch.Generator().manual_seed(2)
    H, D, R, bs = 4, 48, 32, 4
    lens = [5, 17, 9]
    meta = _paged_meta(lens, [1, 1, 1], bs, 32, gen)
    cache = torch.randn(32, bs, D, generator=gen)
    q = torch.randn(3, H, D, generator=gen)
    out = paged_latent_attention(q, cache, meta, 0.3, R)
    flat = cache.view(-1, D)
    for b, L in enumerate(lens):
        ref = causal_latent_attention(q[b:b + 1], flat[meta.slots_of(b, L)], torch.tensor([L - 1]), 0.3, R)
        assert (out[b] - ref[0]).abs().max() < 1e-5


def test_long_context_query_splitting_is_exact(monkeypatch):
    """Splitting queries into blocks (to bound memory at 128K) changes nothing."""
    import raymoe.platform.model.attention as att
    gen = torch.Generator().manual_seed(3)
    q, kv = torch.randn(50, 2, 24, generator=gen), torch.randn(80, 24, generator=gen)
    pos = torch.arange(30, 80)
    whole = att.causal_latent_attention(q, kv, pos, 0.2, 16)
    monkeypatch.setattr(att, "SCORE_BUDGET", 2 * 80 * 7)   # 7 queries per block
    split = att.causal_latent_attention(q, kv, pos, 0.2, 16)
    assert torch.allclose(whole, split, atol=1e-6)
