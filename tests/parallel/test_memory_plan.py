"""The memory dry run: its parameter formula against the real model's parameter count, the 671B figures, the CLI."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from raymoe.cli import app
from raymoe.platform.checkpoint import TinySpec
from raymoe.platform.model.decoder import DeepseekV3ForCausalLM
from raymoe.platform.parallel.memory_plan import count_params, deepseek_v3_config, expert_bytes, plan_memory


def _numel(cfg, prefix: str = "") -> int:
    with torch.device("meta"):
        m = DeepseekV3ForCausalLM(cfg)
    return sum(p.numel() for n, p in m.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, {"num_nextn_predict_layers": 0}])
def test_formula_counts_the_tiny_models_parameters(overrides):
    cfg = TinySpec(overrides=overrides).config()
    c = count_params(cfg)
    assert c.total == _numel(cfg)
    assert c.mtp == _numel(cfg, "mtp.")
    assert c.routed == _numel(cfg) - sum(
        p.numel() for n, p in DeepseekV3ForCausalLM(cfg).named_parameters() if ".experts." not in n)


def test_tiny_plan_bytes_by_hand():
    cfg = TinySpec().config()        # H 64, I_moe 32, 16 experts, 3 MoE + 1 MTP layer, kv 32 + rope 16, 4 + 1 cache
    plan = plan_memory(cfg, gpus=5, gpu_gb=1.0, expert_format="bf16", seqs=2, context=10, reserve_gb=0)
    assert plan.experts_per_shard == 4 and expert_bytes(cfg, "bf16") == 2 * 3 * 64 * 32
    assert plan.shard.weights == 4 * 4 * 2 * 3 * 64 * 32
    assert expert_bytes(cfg, "fp8") == 3 * 64 * 32 + 4 * 3           # one 128x128 block per matrix
    assert plan.kv_bytes_per_token == (32 + 16) * 2 * 5 and plan.router.kv_cache == 2 * 10 * 480
    c = count_params(cfg)
    # bf16 non-routed, the 4 gates [16, 64] 2 bytes more (fp32), their fp32 correction bias [16]
    assert plan.router.weights == 2 * (c.total - c.routed) + 2 * 4 * (16 * 64) + 4 * 4 * 16


def test_deepseek_v3_on_8_h200():
    cfg = deepseek_v3_config()
    c = count_params(cfg)
    assert c.total == _numel(cfg)
    # the release: 671B main + ~11.6B MTP (685B on the Hub counts MTP's own embedding and head copies, 2 x 0.93B)
    assert 670e9 < c.total - c.mtp < 672e9 and 11.5e9 < c.mtp < 11.7e9
    assert 684e9 < c.total + 2 * c.embed < 686e9
    plan = plan_memory(cfg, gpus=8, gpu_gb=141, expert_format="fp8", seqs=4, context=131072)
    assert plan.fits and plan.experts_per_shard == 37
    assert 34e9 < plan.router.weights < 36e9 and 37e9 < plan.router.kv_cache < 38e9
    assert 95e9 < plan.shard.weights < 97e9
    assert not plan_memory(cfg, expert_format="bf16").shards_fit


def test_cli_plan_memory():
    r = CliRunner().invoke(app, ["plan-memory", "--gpus", "8", "--gpu-gb", "141", "--seqs", "4",
                                 "--context", "131072"])
    assert r.exit_code == 0, r.output
    assert "router (GPU 0)" in r.output and "verdict: fits" in r.output
    assert CliRunner().invoke(app, ["plan-memory", "--experts", "bf16"]).exit_code == 1   # shards do not fit
    bad = CliRunner().invoke(app, ["plan-memory", "--gpus", "1"])
    assert bad.exit_code == 2 and "at least 2" in bad.output and "Traceback" not in bad.output
