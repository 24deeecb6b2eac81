"""ModelConfig reads both config.json dialects, derives DeepSeek-V3's figures, and rejects nonsense clearly."""
from __future__ import annotations

import json
import math

import pytest

from raymoe.platform.config import ConfigError, ModelConfig

HUB_V3 = {  # the official release's config.json (architecture fields)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_hub_dialect_full_model_figures():
    cfg = ModelConfig.from_dict(HUB_V3)
    assert cfg.latent_dim == 576
    assert cfg.latent_cache_bytes_per_token() == 70272
    assert cfg.qk_head_dim == 192
    assert math.isclose(cfg.softmax_scale, 0.1352338, rel_tol=1e-6)
    assert cfg.rope_attention_factor == 1.0
    assert cfg.max_context == 131072
    assert cfg.moe_layers == list(range(3, 61))
    assert cfg.quantization_config.weight_block_size == (128, 128)


def test_transformers5_dialect_from_save_pretrained(tmp_path):
    from transformers import AutoConfig
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({k: v for k, v in HUB_V3.items() if k != "quantization_config"}))
    AutoConfig.from_pretrained(hub).save_pretrained(tmp_path / "tf5")
    written = json.loads((tmp_path / "tf5" / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written and written["rope_interleave"] is True
    a, b = ModelConfig.from_pretrained(hub), ModelConfig.from_pretrained(tmp_path / "tf5")
    assert a.rope_scaling == b.rope_scaling and a.rope_theta == b.rope_theta
    assert a.model_dump(exclude={"torch_dtype"}) == b.model_dump(exclude={"torch_dtype"})


def test_transformers5_dialect_literal():
    d = {k: v for k, v in HUB_V3.items() if k not in ("rope_scaling", "rope_theta", "topk_method", "scoring_func")}
    d.update(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
                              "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                              "original_max_position_embeddings": 4096}, rope_interleave=True, head_dim=64)
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_scaling.factor == 40 and cfg.rope_theta == 10000.0 and cfg.rope_interleave
    assert cfg.topk_method == "noaux_tc" and cfg.scoring_func == "sigmoid"
    assert math.isclose(cfg.softmax_scale, 0.1352338, rel_tol=1e-6)


@pytest.mark.parametrize("change, needle", [
    ({"n_group": 7}, "divisible by n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"hidden_size": -1}, "hidden_size"),
    ({"qk_rope_head_dim": 63}, "even"),
    ({"model_type": "llama"}, "not a DeepSeek-V3"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "not supported"),
])
def test_rejects_nonsense_with_named_key(change, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict({**HUB_V3, **change}, source="x/config.json")


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
