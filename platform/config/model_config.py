"""ModelConfig: the DeepSeek-V3 architecture read from a Hugging Face `config.json`.

It understands both dialects found in the wild: the Hub release (`rope_scaling`, `topk_method`, `scoring_func`,
`quantization_config`) and what transformers 5.x `save_pretrained` writes (`rope_parameters`, `rope_interleave`,
`head_dim`). It validates the architecture and rejects what raymoe cannot run with one message naming the key.
It never touches weights.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config.json that raymoe cannot run; the message names the file and the key."""


class RopeScaling(BaseModel):
    """YaRN parameters (HF `rope_scaling` / `rope_parameters`). `type` None means plain RoPE."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["yarn", "default"] = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = 1.0
    mscale_all_dim: float | None = 1.0
    attention_factor: float | None = None
    truncate: bool = True


class QuantizationConfig(BaseModel):
    """The FP8 block-quantisation of the official checkpoint."""

    model_config = ConfigDict(extra="ignore")
    quant_method: Literal["fp8"] = "fp8"
    fmt: Literal["e4m3"] = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: Literal["dynamic"] = "dynamic"


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class ModelConfig(BaseModel):
    """The DeepSeek-V3 architecture. Field names are the HF config.json names."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    vocab_size: int = Field(129280, gt=0)
    hidden_size: int = Field(7168, gt=0)
    intermediate_size: int = Field(18432, gt=0)
    moe_intermediate_size: int = Field(2048, gt=0)
    num_hidden_layers: int = Field(61, gt=0)
    num_nextn_predict_layers: int = Field(1, ge=0)
    num_attention_heads: int = Field(128, gt=0)
    n_shared_experts: int = Field(1, ge=0)
    n_routed_experts: int = Field(256, gt=0)
    num_experts_per_tok: int = Field(8, gt=0)
    routed_scaling_factor: float = 2.5
    n_group: int = Field(8, gt=0)
    topk_group: int = Field(4, gt=0)
    norm_topk_prob: bool = True
    topk_method: Literal["noaux_tc"] = "noaux_tc"
    scoring_func: Literal["sigmoid"] = "sigmoid"
    first_k_dense_replace: int = Field(3, ge=0)
    moe_layer_freq: int = Field(1, ge=1)
    kv_lora_rank: int = Field(512, gt=0)
    q_lora_rank: int | None = Field(1536, gt=0)
    qk_nope_head_dim: int = Field(128, gt=0)
    qk_rope_head_dim: int = Field(64, gt=0)
    v_head_dim: int = Field(128, gt=0)
    hidden_act: Literal["silu"] = "silu"
    max_position_embeddings: int = Field(163840, gt=0)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    quantization_config: QuantizationConfig | None = None
    torch_dtype: str | None = "bfloat16"

    # ---- construction -------------------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _normalise_dialects(cls, data: Any) -> Any:
        """Fold the transformers-5 dialect (`rope_parameters`, `dtype`) into the Hub one."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        rp = data.pop("rope_parameters", None)
        if rp is not None and data.get("rope_scaling") is None:
            rp = dict(rp)
            if "rope_theta" in rp:
                data.setdefault("rope_theta", rp.pop("rope_theta"))
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            if kind not in ("yarn", "default"):
                raise ValueError(f"rope type {kind!r} is not supported (only 'yarn' or 'default')")
            if kind == "yarn":
                rp["type"] = "yarn"
                if rp.get("factor") is None:  # transformers derives it from the two lengths
                    rp["factor"] = data.get("max_position_embeddings", 163840) / rp["original_max_position_embeddings"]
                data["rope_scaling"] = rp
        rs = data.get("rope_scaling")
        if isinstance(rs, dict):
            kind = rs.get("type", rs.get("rope_type", "yarn"))
            if kind not in ("yarn", "default"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'yarn')")
            if kind == "default":
                data["rope_scaling"] = None
            else:
                rs = {k: v for k, v in rs.items() if k != "rope_type"}
                rs["type"] = "yarn"
                data["rope_scaling"] = rs
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data["dtype"]
        if isinstance(data.get("torch_dtype"), dict) or data.get("torch_dtype") is None:
            data["torch_dtype"] = "bfloat16"
        return data

    @model_validator(mode="after")
    def _check_architecture(self) -> "ModelConfig":
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        if per_group < 2:
            raise ValueError(f"each expert group needs >= 2 experts (n_routed_experts / n_group = {per_group})")
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in topk_group groups "
                f"({self.topk_group} x {per_group})")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace ({self.first_k_dense_replace}) exceeds num_hidden_layers "
                             f"({self.num_hidden_layers})")
        if self.moe_layer_freq != 1:
            raise ValueError("moe_layer_freq != 1 is not supported (DeepSeek-V3 uses 1)")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        arch = data.get("model_type")
        if arch is not None and arch not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
            raise ConfigError(f"{source}: model_type {arch!r} is not a DeepSeek-V3 architecture")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "config"
            msg = str(first["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"{source}: invalid {loc}: {msg}" if loc != "config" else f"{source}: {msg}") from None
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise ConfigError(f"{f}: config.json not found")
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(f))

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hub dialect of config.json (what the official release ships)."""
        d = self.model_dump(exclude_none=False)
        d["rope_scaling"] = None if self.rope_scaling is None else {
            k: v for k, v in self.rope_scaling.model_dump().items() if v is not None and k not in ("truncate",)}
        if self.quantization_config is None:
            d.pop("quantization_config")
        else:
            q = self.quantization_config.model_dump()
            q["weight_block_size"] = list(q["weight_block_size"])
            d["quantization_config"] = q
        d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
                 num_key_value_heads=self.num_attention_heads, attention_dropout=0.0, initializer_range=0.02,
                 use_cache=True, aux_loss_alpha=0.001, seq_aux=True, ep_size=1,
                 transformers_version="4.46.3")
        return d

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by MLA: normalised c_kv plus roped k_pe (576 at full size)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5 times YaRN's mscale(factor, mscale_all_dim)^2 (as transformers)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """Multiplier on cos/sin (1.0 for DeepSeek-V3, where mscale == mscale_all_dim)."""
        rs = self.rope_scaling
        if rs is None:
            return 1.0
        if rs.attention_factor is not None:
            return rs.attention_factor
        if rs.mscale and rs.mscale_all_dim:
            return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
        return yarn_mscale(rs.factor)

    @property
    def max_context(self) -> int:
        """Default usable context: max_position_embeddings, capped at 131,072 tokens.

        DeepSeek-V3 was trained and evaluated to 128K (YaRN's long-context stage, needle-in-a-haystack to 128K);
        the config's 163,840 positions beyond that are untested extrapolation, so the default stops there.
        """
        return min(self.max_position_embeddings, 131072)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def latent_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Latent KV-cache bytes per token across all main layers (70,272 for DeepSeek-V3 in bf16)."""
        return self.latent_dim * self.num_hidden_layers * bytes_per_value
