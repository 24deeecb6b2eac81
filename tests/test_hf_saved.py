"""Checkpoints written by transformers 5's own `save_pretrained` (not the release format raymoe's writer copies).

transformers writes DeepseekV3ForCausalLM as one `model.safetensors` with per-expert keys (it splits its fused
experts back on save), an fp32 gate and `e_score_correction_bias`, an untied `lm_head`, and no MTP layer although
config.json keeps `num_nextn_predict_layers`. raymoe loads that without MTP (warned once) and matches transformers'
logits; `save_original_format=False` writes the fused experts, which load too, shard by shard.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymoe.platform.checkpoint import CheckpointError, SafetensorsReader
from raymoe.platform.checkpoint.tokenizer import write_tokenizer
from raymoe.platform.model import from_pretrained

DIMS = dict(hidden_size=64, num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=16, n_group=4,
            topk_group=2, num_experts_per_tok=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, num_attention_heads=4, num_key_value_heads=4,
            moe_intermediate_size=32, intermediate_size=96, vocab_size=512, num_nextn_predict_layers=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """(transformers model, its save_pretrained folder with raymoe's tiny tokenizer, the fused-experts folder)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    torch.manual_seed(0)
    ref = DeepseekV3ForCausalLM(DeepseekV3Config(**DIMS)).float().eval()
    with torch.no_grad():
        for layer in ref.model.layers[DIMS["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)  # routing that the bias actually changes
    root = tmp_path_factory.mktemp("hf_saved")
    ref.save_pretrained(root / "hf")
    write_tokenizer(root / "hf", vocab_size=DIMS["vocab_size"])
    ref.save_pretrained(root / "fused", save_original_format=False)
    return ref, root / "hf", root / "fused"


def test_save_pretrained_format(hf_saved):
    _, path, fused = hf_saved
    r = SafetensorsReader(path)
    assert (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").exists()
    assert not any(k.startswith("model.layers.4.") for k in r.keys())  # the MTP layer is not written
    assert "model.layers.1.mlp.experts.15.gate_proj.weight" in r and "lm_head.weight" in r
    assert r.get("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    assert "model.layers.1.mlp.experts.gate_up_proj" in SafetensorsReader(fused)


def test_loads_without_mtp_and_matches_transformers(hf_saved, caplog):
    ref, path, _ = hf_saved
    with caplog.at_level(logging.WARNING, logger="raymoe.platform.checkpoint.loader"):
        ours = from_pretrained(path, dtype=torch.float32)
        from_pretrained(path, dtype=torch.float32)
    warned = [r for r in caplog.records if "no MTP weights" in r.getMessage()]
    assert len(warned) == 1 and "MTP speculation is unavailable" in warned[0].getMessage()
    assert len(ours.mtp) == 0 and ours.num_cache_layers == DIMS["num_hidden_layers"]
    gen = torch.Generator().manual_seed(7)
    prompts = torch.randint(0, DIMS["vocab_size"], (3, 40), generator=gen)
    with torch.no_grad():
        b = ref(prompts).logits
        for kind in ("naive", "absorbed"):
            assert rel_err(ours(prompts, path=kind), b) <= 1e-4, kind
        ids = prompts[:1, :9]
        for _ in range(8):
            ids = torch.cat([ids, ours(ids)[0, -1].argmax().view(1, 1)], dim=1)
        hf_ids = ref.generate(prompts[:1, :9], attention_mask=torch.ones_like(prompts[:1, :9]), do_sample=False,
                              max_new_tokens=8, min_new_tokens=8, pad_token_id=2)
    assert ids.tolist() == hf_ids.tolist()


def test_fused_experts_load_shard_by_shard(hf_saved):
    _, path, fused = hf_saved
    full = from_pretrained(path, dtype=torch.float32)
    shard = from_pretrained(fused, dtype=torch.float32, experts_range=(4, 12))
    for name, p in shard.named_parameters():
        want = dict(full.named_parameters())[name]
        assert torch.equal(p, want[4:12] if ".mlp.experts." in name else want), name


def test_some_mtp_tensors_is_still_an_error(hf_saved, tmp_path):
    _, path, _ = hf_saved
    sd = load_file(path / "model.safetensors")
    sd["model.layers.4.enorm.weight"] = torch.ones(DIMS["hidden_size"])
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"'model\.layers\.4\.hnorm\.weight' is missing"):
        from_pretrained(tmp_path, dtype=torch.float32)


def test_generate_with_mtp_fails_in_one_line(hf_saved):
    _, path, _ = hf_saved
    raymoe = Path(sys.executable).parent / "raymoe"
    p = subprocess.run([str(raymoe), "generate", "--model", str(path), "--prompt", "hi", "--mtp", "1"],
                       capture_output=True, text=True, timeout=120)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert len(errors) == 1 and "has no MTP weights" in errors[0], p.stderr
