"""Checkpoint I/O: FP8 block dequantisation, expert subsets, sharded layout, and clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from raymoe.platform.checkpoint import CheckpointError, SafetensorsReader, dequantize_blockwise, quantize_blockwise
from raymoe.platform.config import ModelConfig
from raymoe.platform.model import from_pretrained


def reference_dequant(w8: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The format's definition, written as plainly as possible: W[i, j] = fp8[i, j] * s[i // 128, j // 128]."""
    out = torch.empty(w8.shape, dtype=torch.float32)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            blk = (slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block))
            out[blk] = w8[blk].float() * s[bi, bj]
    return out


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (130, 1), (7, 129)])
def test_fp8_roundtrip_edge_blocks(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    q, s = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    d = dequantize_blockwise(q, s, torch.float32)
    assert torch.equal(d, reference_dequant(q, s))
    # e4m3 keeps 3 mantissa bits: relative error per element <= 2^-4 (plus subnormals near zero)
    assert ((d - w).abs() <= w.abs() * 2 ** -4 + s.max() * 2 ** -9).all()


def test_fp8_scale_shape_mismatch_is_named():
    q, s = quantize_blockwise(torch.randn(200, 300))
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \(1, 3\), expected \(2, 3\)"):
        dequantize_blockwise(q, s[:1])


def test_fp8_checkpoint_loads_within_fp8_error_and_equals_reference(tiny_ckpt, tiny_ckpt_fp8):
    cfg = ModelConfig.from_pretrained(tiny_ckpt_fp8)
    assert cfg.quantization_config is not None
    base = from_pretrained(tiny_ckpt, dtype=torch.float32)
    q = from_pretrained(tiny_ckpt_fp8, dtype=torch.float32)
    reader = SafetensorsReader(tiny_ckpt_fp8)
    key = "model.layers.2.self_attn.q_b_proj.weight"
    assert reader.get(key).dtype == torch.float8_e4m3fn
    ref = reference_dequant(reader.get(key), reader.get(key.replace("weight", "weight_scale_inv")))
    assert torch.equal(q.model.layers[2].self_attn.q_b_proj.weight, ref)
    e_ref = reference_dequant(reader.get("model.layers.1.mlp.experts.9.up_proj.weight"),
                              reader.get("model.layers.1.mlp.experts.9.up_proj.weight_scale_inv"))
    I = cfg.moe_intermediate_size
    assert torch.equal(q.model.layers[1].mlp.experts.gate_up_proj[9, I:], e_ref)
    # not quantised in the release format: embeddings, head, norms, gate, eh_proj
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.4.eh_proj.weight", "model.layers.0.input_layernorm.weight"):
        assert reader.get(k).dtype != torch.float8_e4m3fn, k
    for (name, a), (_, b) in zip(base.named_parameters(), q.named_parameters()):
        assert ((a - b).abs() <= a.abs() * 2 ** -4 + a.abs().max() * 2 ** -8).all(), name
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = base(ids), q(ids)
    # end to end the FP8 error compounds (and flips some routing) but the model stays the same model
    assert torch.nn.functional.cosine_similarity(la, lb, dim=-1).mean() > 0.95
    assert (la - lb).norm() / la.norm() < 0.3


def test_expert_subsets_combine_to_full_moe(tiny_ckpt_fp32):
    full = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32)
    E = full.config.n_routed_experts
    lo = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32, experts_range=(0, E // 2))
    hi = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32, experts_range=(E // 2, E))
    x = torch.randn(40, full.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for L in full.config.moe_layers:
        f, a, b = (m.model.layers[L].mlp for m in (full, lo, hi))
        assert a.experts.gate_up_proj.shape[0] == E // 2
        with torch.no_grad():
            ids, w, _ = f.gate(x)
            routed = a.experts(x, ids, w) + b.experts(x, ids, w)
            assert torch.allclose(routed + f.shared_experts(x), f(x), atol=1e-5)
            assert torch.equal(torch.cat([a.experts.down_proj, b.experts.down_proj]), f.experts.down_proj)


def test_expert_subset_never_reads_other_experts(tiny_ckpt_fp32, tmp_path):
    """Delete the file holding experts 8..15: a shard of experts 0..7 still loads (and reads only its bytes)."""
    ck = tmp_path / "half"
    shutil.copytree(tiny_ckpt_fp32, ck)
    index = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    upper = {f for k, f in index.items() if ".experts.15." in k}
    lower = {f for k, f in index.items() if ".experts.0." in k}
    assert len(upper) == 1 and upper != lower
    (ck / upper.pop()).unlink()
    shard = from_pretrained(ck, dtype=torch.float32, experts_range=(0, 8))
    full = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32)
    assert torch.equal(shard.model.layers[1].mlp.experts.gate_up_proj, full.model.layers[1].mlp.experts.gate_up_proj[:8])
    with pytest.raises(CheckpointError, match="missing"):
        from_pretrained(ck, dtype=torch.float32, experts_range=(8, 16))


def test_sharded_index_and_single_file_load_the_same(tiny_ckpt_fp32, tmp_path):
    from safetensors.torch import save_file
    ck = tmp_path / "single"
    ck.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_ckpt_fp32 / f, ck / f)
    reader = SafetensorsReader(tiny_ckpt_fp32)
    save_file({k: reader.get(k) for k in reader.keys()}, str(ck / "model.safetensors"))
    a, b = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32), from_pretrained(ck, dtype=torch.float32)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    index_file = dst / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    edit(dst, index)
    index_file.write_text(json.dumps(index))
    return dst


def test_errors_name_the_culprit(tiny_ckpt_fp32, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        from_pretrained(tmp_path / "nope")
    key = "model.layers.2.self_attn.kv_b_proj.weight"

    def drop(d, index):
        del index["weight_map"][key]
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + ".* missing"):
        from_pretrained(_broken_copy(tiny_ckpt_fp32, tmp_path / "a", drop))

    def missing_shard(d, index):
        (d / index["weight_map"]["lm_head.weight"]).unlink()
    with pytest.raises(CheckpointError, match="shard named in the index is missing"):
        from_pretrained(_broken_copy(tiny_ckpt_fp32, tmp_path / "b", missing_shard))

    def reshape_cfg(d, index):
        cfg = json.loads((d / "config.json").read_text())
        cfg["kv_lora_rank"] = 24
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"kv_a_proj_with_mqa.weight' has shape \(48, 64\), expected \(40, 64\)"):
        from_pretrained(_broken_copy(tiny_ckpt_fp32, tmp_path / "c", reshape_cfg))

    def bad_cfg(d, index):
        cfg = json.loads((d / "config.json").read_text())
        cfg["scoring_func"] = "softmax"
        (d / "config.json").write_text(json.dumps(cfg))
    from raymoe.platform.config import ConfigError
    with pytest.raises(ConfigError, match="scoring_func"):
        from_pretrained(_broken_copy(tiny_ckpt_fp32, tmp_path / "d", bad_cfg))


def test_tiny_checkpoint_layout(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["topk_method"] == "noaux_tc" and cfg["scoring_func"] == "sigmoid"
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    gen = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 1
    reader = SafetensorsReader(tiny_ckpt)
    bias = reader.get("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and bias.abs().min() > 0
    assert reader.get("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    assert "model.layers.4.shared_head.head.weight" in reader and "model.layers.4.embed_tokens.weight" in reader
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    text = "Hello wörld 😀"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == 0 and tok.decode(ids, skip_special_tokens=True) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"


def test_routing_not_degenerate(tiny_ckpt):
    m = from_pretrained(tiny_ckpt, dtype=torch.float32)
    for mod in m.moe_layers():
        mod.count_load()
    ids = torch.randint(3, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = m(ids)
    assert torch.isfinite(logits).all()
    for mod in m.moe_layers()[:-1]:  # the MTP block is not run by forward
        load = mod.expert_load.float()
        assert (load > 0).sum() >= 12 and load.max() / load.mean() < 4, load
