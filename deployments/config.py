"""ServeAppConfig: everything one raymoe Serve application is built from, as one pydantic model.

It is what `build_app` receives (the `args` of a Serve config file, `serve run ... key=value`, or `raymoe serve`),
validated once, with errors naming the key. The engine's own settings travel as one EngineConfig (the `engine` key
holds its fields; `model` is filled in here), so new engine options (expert parallelism's, say) reach the replicas
without this module changing. `engine.kind` picks the engine behind the same ingress: `raymoe` (the default) or
`vllm` (vLLM's AsyncLLM, its limits mapped from the same EngineConfig fields; `engine.vllm` holds what only vLLM
has); `engine: vllm` is short for `engine: {kind: vllm}`. It never touches Ray.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raymoe.deployments.adapters import NAME_RULE, valid_name
from raymoe.platform.config import EngineConfig

LORA_ENGINE_KEYS = ("max_loras", "max_cpu_loras", "max_lora_rank")     # ServeAppConfig keys the engine takes


class AutoscalingSettings(BaseModel):
    """The model deployment's Serve autoscaling_config (the fields raymoe sets; Serve's defaults for the rest)."""
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    metrics_interval_s: float | None = Field(None, gt=0)    # Serve's default (deprecated there; tests set it)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


EngineKind = Literal["raymoe", "vllm"]


class VLLMSettings(BaseModel):
    """What only the vLLM engine has. The shared limits (max_model_len, max_num_seqs, ...) stay EngineConfig's."""
    model_config = ConfigDict(extra="forbid")

    # the Python of an environment with vllm, ray and raymoe, when it is not the app's own (vLLM's pins conflict
    # with the project's: see README); the replicas run there through Ray's runtime_env `py_executable`.
    # None: $RAYMOE_VLLM_PYTHON, else this interpreter if it can import vllm, else .cache/vllm-venv of the checkout
    python: str | None = None
    engine_args: dict[str, Any] = Field(default_factory=dict)   # more vLLM AsyncEngineArgs (tensor_parallel_size...)
    env: dict[str, str] = Field(default_factory=dict)           # VLLM_* variables of the replica (thread binding...)


class ServeAppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None                   # checkpoint directory; None: the built-in tiny model (cached)
    served_model_name: str | None = None       # the `model` clients send; None: the directory's name
    engine: dict[str, Any] = Field(default_factory=dict)   # EngineConfig fields except `model`, plus `kind`
    #                                                        (raymoe | vllm) and `vllm` (VLLMSettings)
    ep: int = Field(1, ge=1)                   # expert shards per replica (1: experts in the replica's process);
    #                                            shard placement and transport: engine.parallel (ParallelConfig)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    max_ongoing_requests: int = Field(64, ge=1)    # per model replica: what its engine batches
    max_queued_requests: int = Field(256, ge=1)    # per ingress replica, waiting for a model replica; then 429
    retry_after_s: int = Field(1, ge=0)            # the Retry-After of a 429
    num_cpus: float = Field(1.0, ge=0)         # per model replica
    num_gpus: float = Field(0.0, ge=0)
    # separate: OpenAIIngress replicas call ModelServer replicas (two process hops per token; the ingress turns a
    # dying model replica into a 503, and is where per-request routing such as adapter multiplexing lives).
    # fused: the OpenAI routes are served by the replica that owns the engine (one hop; a dying replica drops
    # its own connections). ingress_num_cpus / ingress_replicas apply to `separate` only.
    ingress: Literal["separate", "fused"] = "separate"
    # where a model replica steps its engine: `process`, a child process of the replica (vLLM's engine-core split:
    # the replica's event loop, busy with Serve's per-request work for every token, never holds the GIL the steps
    # need; with expert shards the child joins the cluster and starts them in the replica's placement group);
    # `thread`, a thread of the replica (one process less); `auto`: process
    engine_core: Literal["auto", "thread", "process"] = "auto"
    ingress_num_cpus: float = Field(0.5, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    api_key_env: str | None = None             # name of the env var holding the API key; None: no key needed
    max_request_bytes: int = Field(8 * 2 ** 20, ge=1024)   # larger bodies get 413
    default_max_tokens: int = Field(4096, ge=1)  # when a chat request gives none: min(this, the context left)
    reasoning: bool = False                    # split <think>...</think> from chat content into `reasoning`
    metrics_interval_s: float = Field(1.0, gt=0)   # how often each replica reports engine gauges
    runtime_env: dict[str, Any] = Field(default_factory=dict)   # Ray runtime_env of every replica (env_vars...)
    # LoRA adapters (vLLM's --lora-modules / --max-loras ...): `model="<adapter>"` or `"<served name>:<adapter>"`
    lora_root: str | None = None               # folder or s3:// / gs:// URL, one PEFT directory per adapter name
    lora_modules: dict[str, str] = Field(default_factory=dict)  # name -> path, preloaded at start (any path)
    max_loras: int = Field(4, ge=1)            # adapters resident per replica (Serve's multiplexing LRU too)
    max_cpu_loras: int = Field(16, ge=0)       # more kept in host memory per replica
    max_lora_rank: int = Field(64, ge=1)       # adapters of a higher rank are refused (400)

    @model_validator(mode="before")
    @classmethod
    def _engine_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("engine"), str):
            data = {**data, "engine": {"kind": data["engine"]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> "ServeAppConfig":
        if self.engine.get("kind", "raymoe") not in ("raymoe", "vllm"):
            raise ValueError(f"engine.kind: expected raymoe or vllm, got {self.engine['kind']!r}")
        if "vllm" in self.engine and self.engine_kind != "vllm":
            raise ValueError("engine.vllm: only for engine.kind vllm")
        try:
            self.vllm_settings()
        except ValidationError as e:
            raise ValueError(f"engine.vllm.{first_error(e)}") from None
        if self.engine_kind == "vllm" and (self.ep > 1 or (self.engine.get("parallel") or {}).get("num_shards")):
            raise ValueError("ep: expert shards are raymoe's engine; engine.kind vllm runs plain replicas")
        if self.engine_kind == "vllm" and self.ingress == "fused":
            raise ValueError("ingress: fused runs raymoe's engine in the ingress replica; engine.kind vllm needs "
                             "ingress: separate")
        if "model" in self.engine:
            raise ValueError("engine.model: set the checkpoint with the top-level `model` key")
        for key in LORA_ENGINE_KEYS:
            if key in self.engine:
                raise ValueError(f"engine.{key}: set it with the top-level `{key}` key")
        for name in self.lora_modules:
            if not valid_name(name):
                raise ValueError(f"lora_modules: invalid adapter name {name!r} ({NAME_RULE})")
            if name == self.model_name:
                raise ValueError(f"lora_modules: {name!r} is the served model's own name")
        try:
            self.engine_config()               # engine fields are checked now, not on a replica later
        except ValidationError as e:
            raise ValueError(f"engine.{first_error(e)}") from None
        return self

    def engine_config(self) -> EngineConfig:
        """The replicas' EngineConfig. With expert shards (ep > 1, or engine.parallel.num_shards) the router's
        bundle (bundle 0 of the replica's placement group) is the replica's own num_cpus / num_gpus."""
        engine = {k: v for k, v in self.engine.items() if k not in ("kind", "vllm")}
        par = dict(engine.get("parallel") or {})
        if self.ep > 1:
            if par.get("num_shards", self.ep) != self.ep:
                raise ValueError(f"ep ({self.ep}) and engine.parallel.num_shards ({par['num_shards']}) disagree")
            par["num_shards"] = self.ep
        if par.get("num_shards"):
            engine["parallel"] = {"router_cpus": self.num_cpus, "router_gpus": self.num_gpus, **par}
        engine.update({k: getattr(self, k) for k in LORA_ENGINE_KEYS})
        return EngineConfig(model=self.model or "<tiny>", **engine)

    @property
    def engine_process(self) -> bool:
        """Whether model replicas step their engine in a child process (engine_core, `auto`: yes)."""
        return self.engine_core != "thread"

    @property
    def engine_kind(self) -> EngineKind:
        return self.engine.get("kind", "raymoe")

    def vllm_settings(self) -> VLLMSettings:
        return VLLMSettings.model_validate(self.engine.get("vllm") or {})

    @property
    def model_name(self) -> str:
        return self.served_model_name or (Path(self.model).name if self.model else "raymoe-tiny")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None


def first_error(e: ValidationError) -> str:
    """A pydantic error as one line naming the key: `engine.max_num_seqs: Input should be greater than 0`."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg
