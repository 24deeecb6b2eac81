"""The app's config without Ray: the shipped YAMLs are valid Serve deploy configs (what KubeRay's serveConfigV2
takes) whose args are valid ServeAppConfig; bad args fail with one line naming the key; `raymoe serve` refuses bad
input before starting anything."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from raymoe.deployments.app import app_config
from raymoe.deployments.config import ServeAppConfig
from raymoe.deployments.local import read_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "deployments" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    data = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(data)
    app = data["applications"][0]
    assert app["import_path"] == "raymoe.deployments.app:build_app"
    ServeAppConfig.model_validate(app["args"])
    args, prefix = read_config(path)
    assert args == app["args"] and prefix == app["route_prefix"]


@pytest.mark.parametrize("args,needle", [
    ({"engine": {"max_num_seqs": 0}}, "engine.max_num_seqs"),
    ({"engine": {"model": "/x"}}, "engine.model"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas (2) is below min_replicas (3)"),
    ({"max_queued_requests": 0}, "max_queued_requests"),
    ({"bogus": 1}, "bogus"),
    ({"ep": 2, "engine": {"parallel": {"num_shards": 3}}}, "disagree"),
    ({"model": "/definitely/not/here"}, "not a checkpoint directory"),
    ({"engine_core": "fork"}, "engine_core"),
])
def test_bad_args_name_the_key(args, needle, tiny_ckpt_fp32):
    with pytest.raises(ValueError) as e:
        app_config({"model": str(tiny_ckpt_fp32), **args})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_engine_core_auto_is_a_process(tiny_ckpt_fp32):
    base = {"model": str(tiny_ckpt_fp32)}
    assert app_config(base).engine_process
    assert app_config({**base, "ep": 2}).engine_process                  # the child starts the shards
    assert app_config({**base, "ep": 2, "engine_core": "process"}).engine_process
    assert not app_config({**base, "engine_core": "thread"}).engine_process


def test_string_args_from_serve_run_are_coerced(tiny_ckpt_fp32):
    cfg = app_config({"model": str(tiny_ckpt_fp32), "max_ongoing_requests": "8"})     # serve run key=value
    assert cfg.max_ongoing_requests == 8 and cfg.model_name == tiny_ckpt_fp32.name


def test_cli_refuses_bad_input_before_starting(tmp_path):
    exe = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "raymoe"
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_ongoing_requests: -1\n")
    for argv, needle in ([["--config", str(bad)], "max_ongoing_requests"],
                         [["--model", str(tmp_path)], "not a checkpoint directory"],
                         [["--api-key-env", "RAYMOE_SURELY_UNSET_VAR"], "not set"],
                         [["--engine", "tgi"], "--engine: expected raymoe or vllm"]):
        out = subprocess.run([str(exe), "serve", *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("args,needle", [
    ({"engine": "tensorrt"}, "engine.kind: expected raymoe or vllm"),
    ({"engine": {"vllm": {"env": {}}}}, "engine.vllm: only for engine.kind vllm"),
    ({"engine": {"kind": "vllm", "vllm": {"bogus": 1}}}, "engine.vllm.bogus"),
    ({"engine": "vllm", "ep": 2}, "expert shards are raymoe's engine"),
    ({"engine": {"kind": "vllm", "parallel": {"num_shards": 2}}}, "expert shards are raymoe's engine"),
    ({"engine": {"kind": "vllm", "max_num_seqs": 0}}, "engine.max_num_seqs"),
    ({"engine": "vllm", "lora_root": "/tmp"}, "engine.kind vllm on the CPU cannot serve LoRA adapters on a mixture-of-experts"),
])
def test_bad_engine_choice_names_the_key(args, needle, tiny_ckpt_fp32):
    with pytest.raises(ValueError) as e:
        app_config({"model": str(tiny_ckpt_fp32), **args})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_engine_kind_and_vllm_limits_come_from_the_same_keys(tiny_ckpt_fp32):
    from raymoe.deployments.vllm_model import vllm_engine_args
    assert app_config({"model": str(tiny_ckpt_fp32)}).engine_kind == "raymoe"
    short = app_config({"model": str(tiny_ckpt_fp32), "engine": "vllm"})
    assert short.engine_kind == "vllm" and short.engine == {"kind": "vllm"}
    engine = {"kind": "vllm", "max_model_len": 8192, "max_num_seqs": 8, "max_num_batched_tokens": 512,
              "enable_prefix_caching": False, "num_speculative_tokens": 1, "num_blocks": 256, "dtype": "bfloat16",
              "kv_cache_memory_gb": 0.5, "vllm": {"engine_args": {"tensor_parallel_size": 1}}}
    cfg = app_config({"model": str(tiny_ckpt_fp32), "engine": engine})
    ecfg = cfg.engine_config()                 # the kind and vLLM's own settings are not EngineConfig fields
    assert ecfg.max_num_seqs == 8 and ecfg.max_model_len == 8192
    args = vllm_engine_args(ecfg, 131072, cfg.vllm_settings().engine_args)
    assert args["max_num_seqs"] == 8 and args["max_num_batched_tokens"] == 512
    assert args["enable_prefix_caching"] is False and args["dtype"] == "bfloat16"
    assert args["max_model_len"] == 256 * 16              # vLLM's cache must hold max_model_len: capped at the blocks
    assert args["num_gpu_blocks_override"] == 257 and args["kv_cache_memory_bytes"] == 2 ** 29
    assert args["speculative_config"] == {"method": "mtp", "num_speculative_tokens": 1}
    assert args["tensor_parallel_size"] == 1 and args["model"] == str(tiny_ckpt_fp32)
    assert "enable_lora" not in args


def test_vllm_lora_comes_from_the_adapter_pool_keys(tiny_ckpt_fp32):
    """On GPU nodes `engine.kind: vllm` takes adapters through vLLM's LoRA, sized by the same keys as raymoe's
    adapter pool (a rank vLLM does not offer is rounded up to one it does)."""
    from raymoe.deployments.vllm_model import vllm_engine_args
    cfg = app_config({"model": str(tiny_ckpt_fp32), "engine": {"kind": "vllm", "device": "cuda"}, "lora_root": "/tmp",
                      "max_loras": 3, "max_cpu_loras": 9, "max_lora_rank": 48})
    args = vllm_engine_args(cfg.engine_config(), 131072, lora=True)
    assert args["enable_lora"] is True and args["max_loras"] == 3 and args["max_cpu_loras"] == 9
    assert args["max_lora_rank"] == 64
