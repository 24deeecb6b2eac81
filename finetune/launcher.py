"""The driver of a finetuning job: check everything that can be checked before training, run the Ray Train
TorchTrainer, then write the outputs.

`preflight` reads the model config, resolves the LoRA targets on a meta-device model (no weights), reads and
tokenizes the datasets once, and raises a one-line error for any bad input (missing or empty dataset, malformed
JSONL line, unknown target, rank larger than a layer, too little data for one batch) before a worker starts.
`run` connects to Ray (RAY_ADDRESS / a running `ray start` cluster / a new local one), puts the token rows in the
object store, and fits with ScalingConfig, FailureConfig(max_failures) and CheckpointConfig. A job re-submitted
with the same name and storage path resumes from its latest checkpoint (Ray Train restores it).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from raymoe.finetune.config import JobConfig, JobConfigError
from raymoe.finetune.data import DataError, load_examples
from raymoe.finetune.lora import LoraTargetError, plan_lora
from raymoe.finetune.tokens import RowStats, TokenRows, build_rows, split_examples
from raymoe.platform.checkpoint import CheckpointError
from raymoe.platform.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """Training ran but did not finish (the message says why)."""


# Everything that is the job's fault rather than a bug: the CLI prints these as one line.
USER_ERRORS = (JobConfigError, DataError, LoraTargetError, ConfigError, CheckpointError, JobError)


@dataclass
class Prepared:
    train: TokenRows
    validation: TokenRows
    pad_id: int
    train_stats: RowStats
    validation_stats: RowStats


def _tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None


def preflight(job: JobConfig) -> Prepared:
    train = load_examples(job.data.train, job.data.on_bad_line, "data.train")
    if job.data.validation:
        val = load_examples(job.data.validation, job.data.on_bad_line, "data.validation")
    else:
        train, val = split_examples(train, job.data.validation_fraction, job.seed)
    cfg = ModelConfig.from_pretrained(job.model)
    if job.mode == "lora":
        from raymoe.platform.model import DeepseekV3ForCausalLM
        with torch.device("meta"):
            plan_lora(DeepseekV3ForCausalLM(cfg), job.lora, train_gates=job.update_expert_bias)
    if job.mtp_loss_weight > 0 and cfg.num_nextn_predict_layers == 0:
        raise JobConfigError(f"mtp_loss_weight: {job.model} has no MTP module (num_nextn_predict_layers = 0)")
    tok = _tokenizer(job.model)
    rows, stats = build_rows(train, tok, job.data.max_seq_len, job.data.packing)
    if stats.targets == 0:
        raise DataError(f"data.train: no target tokens (no assistant turns, completions or text) in "
                        f"{', '.join(job.data.train)}")
    if len(rows) < job.batch.global_size:
        raise DataError(f"data.train: {len(rows)} rows of up to {job.data.max_seq_len} tokens, fewer than "
                        f"batch.global_size ({job.batch.global_size})")
    val_rows, val_stats = build_rows(val, tok, job.data.max_seq_len, job.data.packing)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if max(int(rows.ids.max(initial=0)), int(val_rows.ids.max(initial=0))) >= cfg.vocab_size:
        raise DataError(f"{job.model}: the tokenizer produces ids beyond the model's vocab_size {cfg.vocab_size}")
    return Prepared(rows, val_rows, pad, stats, val_stats)


def run(job: JobConfig) -> dict:
    """Run the job to completion; returns the summary (also written to output_dir/summary.json)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raymoe.finetune.outputs import write_outputs
    from raymoe.finetune.train_loop import train_loop_per_worker

    start = time.time()
    prepared = preflight(job)
    log.info("data: train %s, validation %s", asdict(prepared.train_stats), asdict(prepared.validation_stats))
    if not ray.is_initialized():
        ray.init()
    data = ray.put((prepared.train, prepared.validation, prepared.pad_id))
    workers = job.scaling.num_workers
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "data": data, "progress_bar": sys.stdout.isatty()},
        scaling_config=ScalingConfig(num_workers=workers if isinstance(workers, int) else tuple(workers),
                                     use_gpu=job.scaling.use_gpu,
                                     resources_per_worker=job.scaling.resources_per_worker),
        run_config=RunConfig(name=job.name, storage_path=job.storage_path,
                             failure_config=FailureConfig(max_failures=job.checkpoint.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.keep)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 (ray.train.TrainingFailedError and friends: report, do not trace)
        raise JobError(f"training failed: {str(e).strip().splitlines()[0]}") from e
    if result.checkpoint is None:
        raise JobError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return write_outputs(job, Path(d), prepared, wall_time_s=time.time() - start)
