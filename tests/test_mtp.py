"""The MTP module (checkpoint layer num_hidden_layers): right tensors, right shapes, the reference formula."""
from __future__ import annotations

import torch

from raymoe.platform.checkpoint import SafetensorsReader
from raymoe.platform.model import from_pretrained


def test_mtp_reads_layer_n_tensors(tiny_ckpt_fp32):
    m = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32)
    n = m.config.num_hidden_layers
    r = SafetensorsReader(tiny_ckpt_fp32)
    mtp = m.mtp[0]
    assert torch.equal(mtp.eh_proj.weight, r.get(f"model.layers.{n}.eh_proj.weight"))
    assert mtp.eh_proj.weight.shape == (m.config.hidden_size, 2 * m.config.hidden_size)
    assert torch.equal(mtp.enorm.weight, r.get(f"model.layers.{n}.enorm.weight"))
    assert torch.equal(mtp.hnorm.weight, r.get(f"model.layers.{n}.hnorm.weight"))
    assert torch.equal(mtp.shared_head.norm.weight, r.get(f"model.layers.{n}.shared_head.norm.weight"))
    assert torch.equal(mtp.block.self_attn.kv_b_proj.weight, r.get(f"model.layers.{n}.self_attn.kv_b_proj.weight"))
    assert torch.equal(mtp.block.mlp.gate.e_score_correction_bias,
                       r.get(f"model.layers.{n}.mlp.gate.e_score_correction_bias"))
    I = m.config.moe_intermediate_size
    assert torch.equal(mtp.block.mlp.experts.gate_up_proj[5, :I], r.get(f"model.layers.{n}.mlp.experts.5.gate_proj.weight"))
    # embedding and head are the main model's; the checkpoint's copies under layer n are identical
    assert torch.equal(r.get(f"model.layers.{n}.embed_tokens.weight"), m.model.embed_tokens.weight)
    assert torch.equal(r.get(f"model.layers.{n}.shared_head.head.weight"), m.lm_head.weight)
    assert m.num_cache_layers == n + 1


def _hf_block(path, layer: int, cfg_hf):
    """transformers' own DeepseekV3DecoderLayer holding checkpoint layer `layer` (an independent implementation)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer
    block = DeepseekV3DecoderLayer(cfg_hf, layer_idx=max(layer, cfg_hf.first_k_dense_replace)).float().eval()
    r = SafetensorsReader(path)
    prefix = f"model.layers.{layer}."
    sd = {}
    E = cfg_hf.n_routed_experts
    for k in r.keys():
        if k.startswith(prefix) and ".experts." not in k:
            sd[k[len(prefix):]] = r.get(k).float()
    sd["mlp.experts.gate_up_proj"] = torch.stack([torch.cat(
        [r.get(f"{prefix}mlp.experts.{e}.gate_proj.weight"), r.get(f"{prefix}mlp.experts.{e}.up_proj.weight")])
        for e in range(E)]).float()
    sd["mlp.experts.down_proj"] = torch.stack([r.get(f"{prefix}mlp.experts.{e}.down_proj.weight")
                                               for e in range(E)]).float()
    missing, _ = block.load_state_dict(sd, strict=False)
    assert not missing, missing
    return block


def test_mtp_logits_follow_reference_formula(tiny_ckpt_fp32):
    from transformers import AutoConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
    m = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32)
    n, T = m.config.num_hidden_layers, 20
    cfg_hf = AutoConfig.from_pretrained(tiny_ckpt_fp32)
    cfg_hf._attn_implementation = "eager"
    r = SafetensorsReader(tiny_ckpt_fp32)
    tokens = torch.randint(3, 1000, (1, T + 1), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h = m.hidden_states(tokens[:, :T])                  # main model's final (normed) hidden states h_i
        ours = m.mtp_logits(h, tokens[:, 1:T + 1])          # predicts t_{i+2} at position i

        def rms(x, w, eps=m.config.rms_norm_eps):
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        emb = r.get(f"model.layers.{n}.embed_tokens.weight").float()[tokens[:, 1:T + 1]]
        x = torch.cat([rms(emb, r.get(f"model.layers.{n}.enorm.weight").float()),
                       rms(h, r.get(f"model.layers.{n}.hnorm.weight").float())], dim=-1)
        x = x @ r.get(f"model.layers.{n}.eh_proj.weight").float().T
        pos = torch.arange(T)[None]
        cos, sin = DeepseekV3RotaryEmbedding(cfg_hf)(x, pos)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        x = _hf_block(tiny_ckpt_fp32, n, cfg_hf)(x, attention_mask=mask, position_ids=pos,
                                                  position_embeddings=(cos, sin))
        x = rms(x, r.get(f"model.layers.{n}.shared_head.norm.weight").float())
        ref = x @ r.get(f"model.layers.{n}.shared_head.head.weight").float().T
    assert ours.shape == (1, T, m.config.vocab_size)
    assert ((ours - ref).abs().max() / ref.abs().max()) < 1e-4


def test_mtp_cached_path_equals_reference(tiny_ckpt_fp32):
    from raymoe.platform.model import PagedAttention
    m = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32)
    T, bs = 12, 4
    tokens = torch.randint(3, 1000, (T + 1,), generator=torch.Generator().manual_seed(6))
    caches = [torch.zeros(8, bs, m.config.latent_dim) for _ in range(m.num_cache_layers)]
    meta = PagedAttention(slot_mapping=torch.arange(T), block_tables=torch.arange(4)[None], query_start=[0, T],
                          seq_lens=[T], block_size=bs)
    with torch.no_grad():
        h = m.forward_cached(tokens[:T], torch.arange(T), caches, meta)
        got = m.compute_logits(m.mtp_forward_cached(h, tokens[1:], torch.arange(T), caches, meta))
        ref = m.mtp_logits(m.hidden_states(tokens[None, :T]), tokens[None, 1:])[0]
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5
