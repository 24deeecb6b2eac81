"""Model figures from ModelConfig alone (no weights): parameters and latent-cache bytes per token for the full
DeepSeek-V3 config, and load time / peak memory of the tiny checkpoint.

    .venv/bin/python benchmarks/model_figures.py
"""
from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from raymoe.platform.config import ModelConfig
from raymoe.platform.model import DeepseekV3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import V3_DIMS, YARN  # noqa: E402

FULL = {**V3_DIMS, "num_nextn_predict_layers": 1, "rope_scaling": YARN}


def count(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        m = DeepseekV3ForCausalLM(cfg)
    mtp = sum(p.numel() for p in m.mtp.parameters())
    total = sum(p.numel() for p in m.parameters())
    routed = sum(p.numel() for n, p in m.named_parameters() if ".experts." in n and not n.startswith("mtp"))
    per_tok_active = total - mtp - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    return dict(main=total - mtp, mtp=mtp + 2 * cfg.vocab_size * cfg.hidden_size, mtp_unique=mtp,
                active=per_tok_active)


def tiny_load() -> tuple[float, float, float]:
    code = """
import resource, sys, time, torch
from raymoe.platform.model import from_pretrained
t = time.perf_counter(); m = from_pretrained(sys.argv[1], dtype=torch.float32); cold = time.perf_counter() - t
t = time.perf_counter(); m = from_pretrained(sys.argv[1], dtype=torch.float32); warm = time.perf_counter() - t
print(cold, warm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    with tempfile.TemporaryDirectory() as d:
        from raymoe.platform.checkpoint import write_tiny_checkpoint
        write_tiny_checkpoint(d)
        runs = [subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, check=True)
                .stdout.split() for _ in range(3)]
    return (min(float(r[0]) for r in runs), min(float(r[1]) for r in runs), max(float(r[2]) for r in runs))


if __name__ == "__main__":
    cfg = ModelConfig.from_dict(FULL)
    c = count(cfg)
    print("| figure | value |\n| --- | --- |")
    print(f"| parameters, main model (embeddings + 61 layers + head) | {c['main'] / 1e9:.1f} B |")
    print(f"| parameters, MTP module (layer 61, incl. its stored embed/head copies) | {c['mtp'] / 1e9:.1f} B |")
    print(f"| parameters, MTP module held by raymoe (embed/head shared) | {c['mtp_unique'] / 1e9:.2f} B |")
    print(f"| parameters active per token (main model) | {c['active'] / 1e9:.1f} B |")
    print(f"| latent cache per token per layer | {cfg.latent_dim} values = {cfg.latent_dim * 2} bytes (bf16) |")
    print(f"| latent cache per token, 61 layers (bf16) | {cfg.latent_cache_bytes_per_token():,} bytes |")
    print(f"| latent cache for one 131,072-token sequence | {cfg.latent_cache_bytes_per_token() * 131072 / 1e9:.2f} GB |")
    plain = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * 2
    print(f"| a plain per-head K/V cache instead, per token (bf16) | {plain:,} bytes ({plain / cfg.latent_cache_bytes_per_token():.1f}x) |")
    cold, warm, mem = tiny_load()
    print(f"| tiny checkpoint load, first in a process (incl. lazy imports; best of 3) | {cold * 1000:.0f} ms |")
    print(f"| tiny checkpoint load, second in the same process (best of 3) | {warm * 1000:.0f} ms |")
    print(f"| peak RSS of that process (python + torch + model) | {mem:.0f} MiB |")
