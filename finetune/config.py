"""The finetuning job file: pydantic models for every key, YAML loading and `--set key=value` overrides.

Owns the schema of `job.yaml` and its defaults, and turns any mistake into one `JobConfigError` line naming the
key (`lora.rank: Input should be greater than 0`). It never touches the model, the data or Ray; checks that need
them (does the dataset exist, is the rank larger than a layer) live where those are read, and run before training.
Relative paths stay as written here; `resolve_paths` makes them absolute against the submitting directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class JobConfigError(ValueError):
    """A job file or override that cannot run; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """JSONL datasets: chat `{"messages": [...]}`, `{"prompt", "completion"}` or plain `{"text"}` records."""

    train: list[str] = Field(min_length=1, description="JSONL files: local paths, or s3:// gs:// ... via fsspec")
    validation: list[str] = Field(default_factory=list)
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="held out of train when no validation")
    max_seq_len: int = Field(512, ge=8)
    packing: bool = Field(True, description="concatenate examples into max_seq_len rows; else one per row, truncated")
    on_bad_line: Literal["error", "skip"] = "error"

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class LoraConfigSpec(_Strict):
    """LoRA rank, scale and targets. Targets are groups or attention projection names (see finetune.lora)."""

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["attention"], min_length=1)

    @field_validator("targets", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [s.strip() for s in v.split(",")] if isinstance(v, str) else v


class OptimConfig(_Strict):
    """AdamW with linear warmup then cosine decay to min_lr_ratio * lr."""

    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)


class BatchConfig(_Strict):
    """Sequences per optimizer step (all workers) and per forward pass; accumulation is derived from them."""

    global_size: int = Field(8, gt=0)
    micro_size: int = Field(4, gt=0)


class ScalingSpec(_Strict):
    """Ray Train ScalingConfig: `num_workers` is an int or [min, max] for elastic training."""

    num_workers: int | tuple[int, int] = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    strategy: Literal["ddp", "fsdp2"] = Field("ddp", description="ddp replicates the model on every worker; fsdp2 "
                                               "shards weights, gradients and optimizer state (mode lora)")

    @field_validator("num_workers")
    @classmethod
    def _positive(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if not 1 <= lo <= hi:
            raise ValueError(f"must be >= 1 (or [min, max] with 1 <= min <= max), got {v}")
        return v

    @property
    def worker_counts(self) -> tuple[int, ...]:
        return (self.num_workers,) if isinstance(self.num_workers, int) else tuple(self.num_workers)


class CheckpointSpec(_Strict):
    every_steps: int = Field(50, gt=0)
    keep: int = Field(2, gt=0, description="checkpoints kept in storage (the latest ones)")
    storage_path: str | None = Field(None, description="Ray Train storage; default <output_dir>/checkpoints")
    max_failures: int = Field(2, ge=-1, description="FailureConfig(max_failures): worker-group restarts")


class JobConfig(_Strict):
    name: str = Field("raymoe-finetune", pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field(description="HF DeepSeek-V3 checkpoint directory")
    output_dir: str
    mode: Literal["lora", "full"] = "lora"
    dtype: Literal["float32", "bfloat16"] = "float32"
    data: DataConfig
    lora: LoraConfigSpec = Field(default_factory=LoraConfigSpec)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs")
    seed: int = 0
    mtp_loss_weight: float = Field(0.0, ge=0, description="weight of the MTP module's next-next-token loss")
    update_expert_bias: bool = Field(False, description="auxiliary-loss-free balancing of the gates' bias")
    expert_bias_rate: float = Field(1e-3, gt=0)
    log_every: int = Field(10, gt=0, description="steps between ray.train.report calls")
    eval_every: int | None = Field(None, gt=0, description="steps between validation passes (and at the end)")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)

    @model_validator(mode="after")
    def _fsdp2_lora_only(self) -> "JobConfig":
        if self.scaling.strategy == "fsdp2" and self.mode != "lora":
            raise ValueError("scaling.strategy fsdp2 is for mode lora (mode full trains small models: use ddp)")
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> "JobConfig":
        for w in self.scaling.worker_counts:
            if self.batch.global_size % (w * self.batch.micro_size):
                raise ValueError(f"batch.global_size ({self.batch.global_size}) must be a multiple of "
                                 f"workers x batch.micro_size ({w} x {self.batch.micro_size})")
        return self

    def resolve_paths(self, base: Path) -> "JobConfig":
        """Absolute local paths (against `base`); URIs (s3://, gs://, file://) stay as they are."""
        def fix(p: str) -> str:
            return p if "://" in p else str((base / Path(p).expanduser()).resolve())
        data = self.data.model_copy(update={"train": [fix(p) for p in self.data.train],
                                            "validation": [fix(p) for p in self.data.validation]})
        ckpt = self.checkpoint.model_copy(update={
            "storage_path": fix(self.checkpoint.storage_path) if self.checkpoint.storage_path else None})
        return self.model_copy(update={"model": fix(self.model), "output_dir": fix(self.output_dir),
                                       "data": data, "checkpoint": ckpt})

    @property
    def storage_path(self) -> str:
        return self.checkpoint.storage_path or str(Path(self.output_dir) / "checkpoints")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise JobConfigError(f"--set {dotted}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key.sub=value` items; values parse as YAML (`2`, `1e-3`, `[a, b]`, `null`, `true`)."""
    tree = dict(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise JobConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _first_error(e: ValidationError, source: str) -> JobConfigError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return JobConfigError(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")


def parse_job(tree: dict[str, Any], source: str = "job") -> JobConfig:
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as e:
        raise _first_error(e, source) from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job file, apply `--set` overrides, validate. Paths are left relative (see resolve_paths)."""
    p = Path(path)
    if not p.is_file():
        raise JobConfigError(f"{p}: job file not found")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise JobConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise JobConfigError(f"{p}: expected a mapping of keys at the top level")
    return parse_job(apply_overrides(tree, overrides or []), source=str(p))
