"""A memory dry run of the expert-parallel layout: bytes per GPU from ModelConfig alone (no weights, no devices).

GPU 0 is the router: embeddings, every layer's MLA attention, the dense layers, the gates (fp32, as the model keeps
them), the shared experts, the LM head and the MTP layer, all in bf16, plus the latent KV cache of `seqs` sequences
of `context` tokens ((kv_lora_rank + qk_rope_head_dim) x 2 bytes per token per cache layer; the MTP layer has its
own cache layer, as the engine allocates), plus on every GPU a fixed reserve for activations, CUDA context
and graphs. The other GPUs are expert shards; each holds at most ceil(n_routed_experts / shards) experts of
every MoE layer, the MTP layer's included (the placement plan covers `model.moe_layers()`, MTP too).

Routed experts are counted as FP8 (1 byte per parameter + one fp32 scale per 128x128 block, the release's format)
or bf16. The `fp8` rows are what a load does: an FP8 checkpoint on CUDA devices (EngineConfig.quantization auto or
fp8, or `load_format: dummy` with fp8) keeps the routed experts in FP8 with exactly these bytes, on the router and
on every expert shard (`load_experts`, the same rule). The router's own linears (attention but kv_b_proj, dense
MLPs, shared experts) are FP8 in such a load too, but counted here in bf16: its rows are an upper bound. Sizes are
decimal GB (1e9 bytes).
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from raymoe.platform.config import ModelConfig

ExpertFormat = Literal["fp8", "bf16"]
GB = 1e9

# The published DeepSeek-V3 config.json (deepseek-ai/DeepSeek-V3; ../shared/reference/deepseek-v3.md)
DEEPSEEK_V3 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                   num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128, n_shared_experts=1,
                   n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
                   kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                   max_position_embeddings=163840,
                   rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                     beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
                   quantization_config=dict(quant_method="fp8", fmt="e4m3", weight_block_size=[128, 128]))


def deepseek_v3_config() -> ModelConfig:
    return ModelConfig.from_dict(DEEPSEEK_V3, source="published DeepSeek-V3 config.json")


class ParamCounts(BaseModel):
    """Parameters by role, counted from the config (what `DeepseekV3ForCausalLM` builds, without its buffers)."""
    embed: int                 # [V, H]
    lm_head: int               # [H -> V]
    attention: int             # one MLA layer: q (LoRA or dense), kv_a, kv_b, o, their norms, the two layer norms
    dense_mlp: int             # one dense layer's MLP: gate/up [I, H], down [H, I]
    gate: int                  # one MoE layer's router gate [E, H] (fp32 in the model)
    shared: int                # one MoE layer's shared experts
    expert: int                # one routed expert of one layer: gate_up [2 I_moe, H] + down [H, I_moe]
    mtp_extra: int             # per MTP layer beyond its decoder block: enorm, hnorm, eh_proj [H, 2H], final norm
    final_norm: int
    layers: int
    dense_layers: int
    moe_layers: int            # main-model MoE layers (the MTP layers' blocks are MoE too)
    mtp_layers: int
    n_experts: int

    @property
    def routed(self) -> int:
        return (self.moe_layers + self.mtp_layers) * self.n_experts * self.expert

    @property
    def non_routed(self) -> int:
        per_moe = self.attention + self.gate + self.shared
        return (self.embed + self.lm_head + self.final_norm + self.dense_layers * (self.attention + self.dense_mlp)
                + (self.moe_layers + self.mtp_layers) * per_moe + self.mtp_layers * self.mtp_extra)

    @property
    def total(self) -> int:
        return self.non_routed + self.routed

    @property
    def mtp(self) -> int:
        """The MTP layers' own parameters (embedding and LM head are shared with the main model)."""
        return self.mtp_layers * (self.attention + self.gate + self.shared + self.n_experts * self.expert
                                  + self.mtp_extra)


def count_params(cfg: ModelConfig) -> ParamCounts:
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = (H * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * nh * qk) if cfg.q_lora_rank else H * nh * qk
    kv = H * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank \
        + cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attention = q + kv + nh * cfg.v_head_dim * H + 2 * H
    moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return ParamCounts(embed=cfg.vocab_size * H, lm_head=cfg.vocab_size * H, attention=attention,
                       dense_mlp=3 * H * cfg.intermediate_size, gate=cfg.n_routed_experts * H,
                       shared=3 * H * cfg.moe_intermediate_size * cfg.n_shared_experts,
                       expert=3 * H * cfg.moe_intermediate_size, mtp_extra=2 * H + 2 * H * H + H, final_norm=H,
                       layers=cfg.num_hidden_layers, dense_layers=cfg.num_hidden_layers - moe, moe_layers=moe,
                       mtp_layers=cfg.num_nextn_predict_layers, n_experts=cfg.n_routed_experts)


def expert_bytes(cfg: ModelConfig, fmt: ExpertFormat, block: int = 128) -> int:
    """Bytes of one routed expert of one layer: gate, up [I_moe, H] and down [H, I_moe]."""
    H, inter = cfg.hidden_size, cfg.moe_intermediate_size
    if fmt == "bf16":
        return 2 * 3 * H * inter
    blocks = 2 * math.ceil(inter / block) * math.ceil(H / block) + math.ceil(H / block) * math.ceil(inter / block)
    return 3 * H * inter + 4 * blocks


class GpuMemory(BaseModel):
    role: str
    weights: int               # bytes
    kv_cache: int = 0
    reserve: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.reserve


class MemoryPlan(BaseModel):
    gpus: int
    gpu_bytes: int
    expert_format: ExpertFormat
    seqs: int
    context: int
    params: ParamCounts
    router: GpuMemory
    shard: GpuMemory           # the fullest shard (ceil(E / shards) experts per MoE layer)
    experts_per_shard: int
    kv_bytes_per_token: int
    router_kv_tokens_free: int   # cache tokens the router could still hold after weights, reserve and the asked cache

    @property
    def router_fits(self) -> bool:
        return self.router.total <= self.gpu_bytes

    @property
    def shards_fit(self) -> bool:
        return self.shard.total <= self.gpu_bytes

    @property
    def fits(self) -> bool:
        return self.router_fits and self.shards_fit

    def table(self) -> str:
        g = self.gpu_bytes / GB
        rows = [f"{'GPU':<22}{'weights GB':>12}{'KV GB':>10}{'reserve GB':>12}{'total GB':>10}{'of':>8}  fits",
                *(f"{name:<22}{m.weights / GB:>12.1f}{m.kv_cache / GB:>10.1f}{m.reserve / GB:>12.1f}"
                  f"{m.total / GB:>10.1f}{g:>8.0f}  {'yes' if m.total <= self.gpu_bytes else 'NO'}"
                  for name, m in ((self.router.role, self.router), (self.shard.role, self.shard)))]
        p = self.params
        rows += [f"parameters: {p.total / 1e9:.1f}B ({(p.total - p.mtp) / 1e9:.1f}B main + {p.mtp / 1e9:.1f}B MTP), "
                 f"routed {p.routed / 1e9:.1f}B; experts {self.expert_format}, {self.experts_per_shard} per shard "
                 f"x {p.moe_layers + p.mtp_layers} MoE layers",
                 f"KV cache: {self.kv_bytes_per_token} bytes/token, {self.seqs} x {self.context} tokens; the router "
                 f"has room for {self.router_kv_tokens_free} more tokens",
                 f"verdict: {'fits' if self.fits else 'does NOT fit'} on {self.gpus} x {g:.0f} GB"]
        return "\n".join(rows)


def plan_memory(cfg: ModelConfig, gpus: int = 8, gpu_gb: float = 141.0, expert_format: ExpertFormat = "fp8",
                seqs: int = 4, context: int = 131072, reserve_gb: float = 8.0) -> MemoryPlan:
    """GPU 0 the router, GPUs 1..gpus-1 the expert shards; raises ValueError on input that names no layout."""
    if gpus < 2:
        raise ValueError(f"gpus must be at least 2 (one router and one expert shard), got {gpus}")
    if gpu_gb <= 0 or reserve_gb < 0 or seqs < 0 or context < 0:
        raise ValueError("gpu_gb must be > 0 and reserve_gb, seqs, context >= 0")
    if expert_format not in ("fp8", "bf16"):
        raise ValueError(f"expert_format must be fp8 or bf16, got {expert_format!r}")
    p = count_params(cfg)
    shards = gpus - 1
    per_shard = math.ceil(cfg.n_routed_experts / shards)
    # weights: bf16 except the gates, which the model keeps in fp32 (+ their fp32 correction bias [E])
    moe = p.moe_layers + p.mtp_layers
    router_w = 2 * p.non_routed + 2 * moe * p.gate + 4 * moe * cfg.n_routed_experts
    kv_tok = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    router = GpuMemory(role="router (GPU 0)", weights=router_w, kv_cache=seqs * context * kv_tok,
                       reserve=int(reserve_gb * GB))
    shard = GpuMemory(role=f"shard x{shards} (GPU 1..{shards})",
                      weights=per_shard * moe * expert_bytes(cfg, expert_format), reserve=int(reserve_gb * GB))
    gpu_bytes = int(gpu_gb * GB)
    return MemoryPlan(gpus=gpus, gpu_bytes=gpu_bytes, expert_format=expert_format, seqs=seqs, context=context,
                      params=p, router=router, shard=shard, experts_per_shard=per_shard, kv_bytes_per_token=kv_tok,
                      router_kv_tokens_free=max(0, (gpu_bytes - router.total) // kv_tok))
