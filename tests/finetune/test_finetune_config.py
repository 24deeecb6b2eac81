"""The job file: the shipped example, `--set` overrides of the scriptable keys, one-line errors naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from raymoe.finetune.config import JobConfigError, load_job

from ft_helpers import CONFIGS, REPO

EXAMPLE = CONFIGS / "tiny-lora.yaml"


def test_example_job_is_valid_and_complete():
    job = load_job(EXAMPLE)
    assert (job.mode, job.lora.targets, job.max_steps, job.scaling.num_workers) == ("lora", ["all"], 60, 2)
    assert job.batch.global_size % (job.scaling.num_workers * job.batch.micro_size) == 0
    assert Path(REPO / job.data.train[0]).is_file()


def test_set_reaches_every_scriptable_key(tmp_path):
    job = load_job(EXAMPLE, [
        "model=/m", "data.train=/a.jsonl", "data.validation=/v.jsonl", "output_dir=/o", "lora.rank=4",
        "lora.alpha=8.5", "lora.targets=[attention, routed_experts]", "max_steps=7", "seed=3",
        "scaling.num_workers=[1, 2]"])
    assert job.model == "/m" and job.output_dir == "/o"
    assert job.data.train == ["/a.jsonl"] and job.data.validation == ["/v.jsonl"]
    assert (job.lora.rank, job.lora.alpha, job.lora.targets) == (4, 8.5, ["attention", "routed_experts"])
    assert (job.max_steps, job.seed, job.scaling.num_workers) == (7, 3, (1, 2))
    assert load_job(EXAMPLE, ["lora.targets=q_a_proj,o_proj"]).lora.targets == ["q_a_proj", "o_proj"]


@pytest.mark.parametrize("override, message", [
    ("lora.rnk=4", "lora.rnk: unknown key"),
    ("lora.rank=0", "lora.rank: Input should be greater than 0"),
    ("mode=half", "mode: Input should be 'lora' or 'full'"),
    ("scaling.num_workers=[3, 1]", "scaling.num_workers: must be >= 1"),
    ("batch.micro_size=3", "batch.global_size (8) must be a multiple of workers x batch.micro_size (2 x 3)"),
    ("lora=5", "lora: Input should be a valid dictionary"),
    ("no_equals_sign", "--set expects KEY=VALUE"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(JobConfigError) as e:
        load_job(EXAMPLE, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(JobConfigError, match="job file not found"):
        load_job(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: a\ndata: [unclosed\n")
    with pytest.raises(JobConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_job(bad)


def test_relative_paths_resolve_against_the_submitting_directory(tmp_path):
    job = load_job(EXAMPLE, ["data.validation=s3://bucket/val.jsonl"]).resolve_paths(tmp_path)
    assert job.model == str(tmp_path / ".cache" / "tiny")
    assert job.data.train == [str(tmp_path / "finetune" / "configs" / "tiny-qa.jsonl")]
    assert job.data.validation == ["s3://bucket/val.jsonl"]
    assert job.storage_path == str(tmp_path / ".cache" / "adapters" / "tiny-qa" / "checkpoints")


def test_fsdp2_is_for_lora_jobs():
    with pytest.raises(JobConfigError, match="fsdp2 is for mode lora"):
        load_job(CONFIGS / "tiny-lora.yaml", ["scaling.strategy=fsdp2", "mode=full"])
    assert load_job(CONFIGS / "tiny-lora.yaml", ["scaling.strategy=fsdp2"]).scaling.strategy == "fsdp2"
