"""Small random DeepSeek-V3 checkpoints in the exact Hugging Face layout, for tests, demos and benchmarks.

Owns the tiny presets and the random initialisation. Weights are scaled so activations stay finite, logits are
not flat (std ~ 1/sqrt(fan_in), so top-1/top-2 logit gaps are O(0.1), not transformers' 1e-3) and routing is not
degenerate (gate logits O(1), a nonzero e_score_correction_bias). Written with `writer.save_checkpoint`, plus a
tokenizer and generation_config.json. Weights never come from a hub.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from raymoe.platform.checkpoint.tokenizer import write_tokenizer
from raymoe.platform.checkpoint.writer import save_checkpoint
from raymoe.platform.config import ModelConfig
from raymoe.platform.model.decoder import DeepseekV3ForCausalLM
from raymoe.platform.model.fp8 import FP8_DTYPE, fp8_random_

Preset = Literal["tiny", "vllm"]

PRESETS: dict[str, dict] = {
    # ~0.5M parameters: every mechanism of the full model at toy width; YaRN exactly as the release.
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=16,
                 num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, num_nextn_predict_layers=1),
    # The MLA sizes vLLM's CPU backend accepts (kv_lora_rank 512, qk_rope_head_dim 64), still small elsewhere.
    "vllm": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
                 num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128,
                 kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, n_routed_experts=16,
                 num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, num_nextn_predict_layers=1),
}
_RELEASE_ROPE = dict(rope_theta=10000.0, max_position_embeddings=163840,
                     rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                       beta_slow=1, mscale=1.0, mscale_all_dim=1.0))


class TinySpec(BaseModel):
    """What `raymoe tiny-checkpoint` writes. `overrides` are ModelConfig fields on top of the preset."""

    preset: Preset = "tiny"
    seed: int = 0
    fp8: bool = False
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    expert_files: int = Field(2, ge=1)
    overrides: dict = Field(default_factory=dict)

    def config(self) -> ModelConfig:
        return ModelConfig.from_dict({**_RELEASE_ROPE, **PRESETS[self.preset], **self.overrides},
                                     source=f"tiny preset {self.preset!r}")


@torch.no_grad()
def random_init(model: DeepseekV3ForCausalLM, seed: int) -> None:
    """Fill every parameter (and the gates' correction bias) in place, on the model's device and in its dtypes.

    The generator lives on that device, so nothing is built on the host: the same rule initialises a tiny
    checkpoint (CPU, fp32: the bytes `write_tiny_checkpoint` always wrote) and a full-size `load_format: dummy`
    model straight on a GPU (bf16, or FP8 weights with block scales: `fp8_random_`). The same seed gives the same
    weights on the same device and dtype only.
    """
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith("_scale_inv"):                               # filled with its FP8 weight below
            continue
        if p.dtype == FP8_DTYPE:                                      # an FP8 weight (model/fp8.py) and its scales
            fp8_random_(p, params[f"{name}_scale_inv"], g)
        elif p.dim() == 1:                                            # norm weights: around 1
            p.normal_(generator=g).mul_(0.1).add_(1.0)
        elif name.endswith("embed_tokens.weight"):
            p.normal_(generator=g)
        else:                                                         # [out, in] or stacked [E, out, in]
            p.normal_(generator=g).div_(math.sqrt(p.shape[-1]))
    for mod in model.moe_layers():
        b = mod.gate.e_score_correction_bias                          # [E] fp32
        b.normal_(generator=g).mul_(0.05)


def write_tiny_checkpoint(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    spec = spec or TinySpec()
    cfg = spec.config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_tok = write_tokenizer(out, vocab_size=min(1000, cfg.vocab_size))
    if n_tok > cfg.vocab_size:
        raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's {n_tok} tokens")
    model = DeepseekV3ForCausalLM(cfg)
    random_init(model, spec.seed)
    save_checkpoint(model, out, dtype=getattr(torch, spec.dtype), fp8=spec.fp8, expert_files=spec.expert_files)
    gen = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
           "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out
