"""YaRN frequencies match the reference doc's figures and transformers' implementation."""
from __future__ import annotations

import math

import torch

from raymoe.platform.config import ModelConfig
from raymoe.platform.model.rope import RotaryEmbedding, yarn_inv_freq
from test_config import HUB_V3


def test_full_config_correction_range_and_blend():
    cfg = ModelConfig.from_dict(HUB_V3)
    f = yarn_inv_freq(cfg)
    base = 10000 ** (-torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    low, high = 10, 23   # floor(10.47), ceil(22.51) per the reference
    assert torch.allclose(f[:low + 1], base[:low + 1])                   # r_i = 0: original frequencies
    assert torch.allclose(f[high:], base[high:] / 40)                    # r_i = 1: interpolated by the factor
    i = 15
    r = (i - low) / (high - low)
    assert math.isclose(f[i].item(), base[i].item() * (1 - r) + base[i].item() / 40 * r, rel_tol=1e-6)


def test_matches_transformers_rotary_embedding():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
    d = {k: v for k, v in HUB_V3.items() if k != "quantization_config"}
    hf = DeepseekV3RotaryEmbedding(DeepseekV3Config(**d))
    ours = RotaryEmbedding(ModelConfig.from_dict(HUB_V3))
    pos = torch.tensor([0, 1, 4095, 4096, 50000, 131071])
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), pos[None])
    c, s = ours.cos_sin(pos)
    assert torch.allclose(cos[0, :, :32], c, atol=1e-5) and torch.allclose(sin[0, :, :32], s, atol=1e-5)


def test_interleaved_rotation_is_pairwise_complex():
    """Checkpoint rope rows are interleaved pairs rotated as complex numbers (DeepSeek's own formulation)."""
    cfg = ModelConfig.from_dict(HUB_V3)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([3, 700, 9000])
    cos, sin = rope.cos_sin(pos)
    out = rope.rotate(x, cos, sin)
    z = torch.view_as_complex(x.view(3, 2, 32, 2)) * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, None]
    ref = torch.view_as_real(z)                                          # interleaved result
    assert torch.allclose(out[..., :32], ref[..., 0], atol=1e-5) and torch.allclose(out[..., 32:], ref[..., 1], atol=1e-5)
