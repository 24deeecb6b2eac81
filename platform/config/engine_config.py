"""EngineConfig (how the inference engine runs), SamplingParams (what one request asks for) and GrammarSpec (what
a request's output must match, when it is constrained).

Both validate on construction and fail with a message naming the field; the engine trusts them afterwards.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raymoe.platform.config.parallel_config import ParallelConfig


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    # None: float32 on CPU, bfloat16 on CUDA. bfloat16 on the CPU: weights, activations and the latent cache in bf16
    # (oneDNN GEMMs, AMX / AVX-512-BF16 where the CPU has them; with cpu_compile the frozen weights are prepacked),
    # the gates' logits, scores and top-k, norm statistics and attention softmax in fp32
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    device: str = "cpu"
    block_size: int = Field(16, gt=0)
    num_blocks: int | None = Field(None, gt=0)        # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = Field(1.0, gt=0)
    max_model_len: int | None = Field(None, gt=0)     # None: the model's context (131,072 for DeepSeek-V3)
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int = Field(2048, gt=0)  # token budget of one step: the prefill chunk size
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    num_speculative_tokens: int = Field(0, ge=0)     # MTP drafts per step (0: off)
    cuda_graph_sizes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    enforce_eager: bool = False                       # True: no CUDA graphs, no cpu_compile
    # CPU: run decode and MTP-verification steps through torch.compile (several times faster per step on small
    # models; each shape class compiles once at first use, tens of seconds on two cores)
    cpu_compile: bool = False
    cpu_threads: int | None = Field(None, gt=0)       # torch intra-op threads on CPU (None: torch's default)
    seed: int = 0
    # auto: the checkpoint's safetensors. dummy: config.json only, random weights of the real shapes and dtypes made
    # on `device` from `seed` (memory / speed / plumbing runs of full-size models; the text is meaningless)
    load_format: Literal["auto", "dummy"] = "auto"
    # FP8 weights (the release's e4m3 weights with 128x128 block scales). auto: an FP8 checkpoint keeps them in FP8
    # on a CUDA device (Triton weight-only FP8 GEMMs: half the weight bytes per step) and is dequantised to `dtype`
    # on the CPU. fp8: kept in FP8 on any device (the CPU dequantises per call: slow, a reference for tests; an FP8
    # checkpoint, or load_format dummy, is required). none: always dequantised at load. kv_b_proj is dequantised in
    # every case (absorbed MLA needs its dense matrix); expert shards follow the same rule on their own device.
    quantization: Literal["auto", "fp8", "none"] = "auto"
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)   # expert shards (none by default)
    max_loras: int = Field(4, gt=0, description="LoRA adapters resident on the device at once (per-request "
                           "adapters; least recently used evicted when a request needs another)")
    max_cpu_loras: int = Field(16, ge=0, description="further adapters kept in host memory (least recently "
                               "used dropped; read from disk again when needed)")
    max_lora_rank: int = Field(64, gt=0, description="largest adapter rank accepted; the device buffers are "
                               "sized for it (max_loras x max_lora_rank per adapted weight)")

    @model_validator(mode="after")
    def _dummy_local(self) -> "EngineConfig":
        if self.load_format == "dummy" and self.parallel.num_shards > 0:
            raise ValueError("load_format 'dummy' does not reach expert shards yet (they read their experts from "
                             "the checkpoint); use parallel.num_shards 0")
        return self


GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "ebnf", "structural_tag"]


class GrammarSpec(BaseModel):
    """A constraint on a request's output, in its canonical text (compiled once per distinct spec by
    engine/grammar.py): a JSON schema (compact JSON), nothing for any JSON object, a regex, a JSON list of choices,
    an EBNF grammar, or an xgrammar structural tag (JSON; tool calls). `strict` (JSON schemas): no properties
    beyond the schema's."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: GrammarKind
    value: str = ""
    strict: bool = True


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, ge=1, le=64)
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(0, ge=0)            # 0: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    logprobs: int | None = Field(None, ge=0, le=20)
    skip_special_tokens: bool = True
    grammar: GrammarSpec | None = None       # constrained decoding (None: free text)
    adapter: str | None = Field(None, description="LoRA adapter loaded into the engine (LLMEngine.load_adapter) "
                                "that this request runs with; None: the base model")

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"max_tokens must be at least 1, got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"temperature must be >= 0, got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        return [v] if isinstance(v, str) else (v or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
