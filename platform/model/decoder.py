"""The DeepSeek-V3 decoder: blocks (MLA + dense MLP or MoE), the stack with embeddings, norm and LM head.

Module names mirror the Hugging Face layout (model.embed_tokens, model.layers.L.self_attn.q_a_proj, ...,
model.layers.L.mlp.experts.gate_up_proj, lm_head), so checkpoint keys and PEFT adapter keys map one to one.
Two ways in: `forward(input_ids [B, T])` gives full causal logits without a cache (the reference path), and
`forward_cached(input_ids [N], positions [N], caches, meta)` runs flat tokens of many sequences against the paged
latent cache (the engine path). The MTP modules live in `self.mtp` (checkpoint layers num_hidden_layers + k).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from raymoe.platform.config import ModelConfig
from raymoe.platform.model.attention import PagedAttention
from raymoe.platform.model.mla import MLA
from raymoe.platform.model.mlp import MLP
from raymoe.platform.model.moe import MoE, RoutedExperts
from raymoe.platform.model.norm import RMSNorm
from raymoe.platform.model.rope import RotaryEmbedding

AttnPath = Literal["naive", "absorbed"]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding, moe: bool,
                 experts: RoutedExperts | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.self_attn = MLA(cfg, rope)
        self.mlp = MoE(cfg, layer, experts) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, path: AttnPath = "naive") -> torch.Tensor:
        # x: [B, T, hidden]; positions: [B, T] -> [B, T, hidden]
        a = self.input_layernorm(x)
        attn = self.self_attn.forward_naive if path == "naive" else self.self_attn.forward_absorbed
        x = x + attn(a, positions)
        B, T, H = x.shape
        return x + self.mlp(self.post_attention_layernorm(x).view(B * T, H)).view(B, T, H)

    def forward_cached(self, x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
                       meta: PagedAttention) -> torch.Tensor:
        # x: [N, hidden]; positions: [N] -> [N, hidden]
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), positions, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(nn.Module):
    """Multi-token prediction module k (checkpoint layer num_hidden_layers + k).

    h' = block(eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])) at position i; logits = head(shared_head.norm(h')).
    h_i is the main model's final hidden state (after model.norm, as vLLM feeds it); embed and head are the main
    model's (the checkpoint stores copies under this layer; the loader does not read them, so they are not held twice).
    """

    def __init__(self, cfg: ModelConfig, index: int, rope: RotaryEmbedding,
                 experts: RoutedExperts | None = None) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.block = DecoderLayer(cfg, cfg.num_hidden_layers + index, rope, moe=True, experts=experts)
        self.shared_head = SharedHead(cfg)

    def combine(self, emb_next: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # emb_next, hidden: [..., H] -> [..., H]
        return self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(hidden)], dim=-1))


class DeepseekV3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, experts_range: tuple[int, int] | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, rope, cfg.is_moe_layer(i), _experts(cfg, experts_range) if cfg.is_moe_layer(i)
                         else None) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def _experts(cfg: ModelConfig, experts_range: tuple[int, int] | None) -> RoutedExperts:
    first, end = experts_range if experts_range is not None else (0, cfg.n_routed_experts)
    return RoutedExperts(cfg, first, end - first)


class DeepseekV3ForCausalLM(nn.Module):
    """The whole network. `experts_range=(a, b)` builds routed experts a..b-1 only (an expert-parallel shard)."""

    def __init__(self, cfg: ModelConfig, experts_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.experts_range = experts_range or (0, cfg.n_routed_experts)
        self.rope = RotaryEmbedding(cfg)
        self.model = DeepseekV3Model(cfg, self.rope, experts_range)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPLayer(cfg, k, self.rope, _experts(cfg, experts_range))
                                 for k in range(cfg.num_nextn_predict_layers))

    @property
    def num_cache_layers(self) -> int:
        """Latent-cache layers the engine allocates: the main layers, then one per MTP module."""
        return self.config.num_hidden_layers + len(self.mtp)

    # ---- reference path (no cache) -------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, path: AttnPath = "naive") -> torch.Tensor:
        # input_ids: [B, T] -> final hidden states after model.norm [B, T, hidden]
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, positions, path)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, path: AttnPath = "naive") -> torch.Tensor:
        # input_ids: [B, T] -> logits [B, T, vocab]
        return self.lm_head(self.hidden_states(input_ids, path))

    def mtp_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, k: int = 0,
                   path: AttnPath = "naive") -> torch.Tensor:
        # hidden: [B, T, H] main-model hidden at positions 0..T-1; input_ids: [B, T] tokens t_1..t_T (shifted by one)
        # -> [B, T, vocab] MTP logits predicting t_{i+2} at position i
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        m = self.mtp[k]
        x = m.combine(self.model.embed_tokens(input_ids), hidden)
        x = m.block(x, positions, path)
        return self.lm_head(m.shared_head.norm(x))

    # ---- engine path (paged latent cache) ------------------------------------------------------------------------
    def forward_cached(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[torch.Tensor],
                       meta: PagedAttention) -> torch.Tensor:
        # input_ids, positions: [N]; caches: num_cache_layers x [blocks, block_size, latent] -> hidden [N, H]
        x = self.model.embed_tokens(input_ids)
        for layer, cache in zip(self.model.layers, caches):
            x = layer.forward_cached(x, positions, cache, meta)
        return self.model.norm(x)

    def mtp_forward_cached(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                           caches: list[torch.Tensor], meta: PagedAttention, k: int = 0) -> torch.Tensor:
        # hidden: [N, H] main hidden at `positions`; next_ids: [N] the token after each -> MTP hidden [N, H]
        m = self.mtp[k]
        x = m.combine(self.model.embed_tokens(next_ids), hidden)
        x = m.block.forward_cached(x, positions, caches[self.config.num_hidden_layers + k], meta)
        return m.shared_head.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, H] -> [N, vocab]
        return self.lm_head(hidden)

    def remote_experts(self) -> bool:
        """Whether some MoE layer's dispatch leaves the process (then no CUDA graph may capture a step)."""
        return any(m.dispatch is not None and m.dispatch.remote for m in self.moe_layers())

    def moe_layers(self) -> list[MoE]:
        layers = list(self.model.layers) + [m.block for m in self.mtp]
        return [l.mlp for l in layers if isinstance(l.mlp, MoE)]
