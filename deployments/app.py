"""The one app builder: ServeAppConfig -> a Serve Application (ingress -> model deployment, plus metrics; or, with
`ingress: fused`, one deployment serving the OpenAI routes from the replicas that own the engines).

    serve run raymoe.deployments.app:build_app model=/path/to/ckpt
    serve deploy deployments/configs/tiny.yaml            (import_path: raymoe.deployments.app:build_app)
    raymoe serve --model /path/to/ckpt                    (raymoe.deployments.local)

With no `model`, the built-in tiny model is written once under the cache folder ($RAYMOE_CACHE, else
$XDG_CACHE_HOME/raymoe, else ~/.cache/raymoe) and served. `api_key_env` names a variable read on the ingress's
node (never copied into the app's config, which the dashboard shows). With `engine.kind: vllm` the model deployment
is VLLMServer, run by the Python of vLLM's environment when that is not this one (`vllm_runtime_env`). This module
wires deployments only.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from raymoe.deployments.adapters import FILES, AdapterRef, is_url
from raymoe.deployments.config import ServeAppConfig, VLLMSettings, first_error
from raymoe.deployments.ingress import OpenAIIngress
from raymoe.deployments.metrics import MetricsCollector
from raymoe.deployments.model import ModelServer
from raymoe.deployments.vllm_model import VLLMServer
from raymoe.platform.config import EngineConfig, ModelConfig


def cache_dir() -> Path:
    if os.environ.get("RAYMOE_CACHE"):
        return Path(os.environ["RAYMOE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raymoe"


def tiny_model(preset: str = "tiny") -> Path:
    """The built-in tiny checkpoint (preset `vllm` for the vLLM engine: MLA sizes its CPU backend runs), written once
    (atomically: a half-written one is never served)."""
    out = cache_dir() / ("tiny" if preset == "tiny" else f"tiny-{preset}")
    if (out / "config.json").is_file():
        return out
    from raymoe.platform.checkpoint import TinySpec, write_tiny_checkpoint
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tiny-", dir=out.parent))
    write_tiny_checkpoint(tmp, TinySpec(preset=preset))
    try:
        tmp.rename(out)
    except OSError:                            # another process won the race: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def app_config(args: dict[str, Any] | ServeAppConfig) -> ServeAppConfig:
    """Validate builder args (raises ValueError naming the key); fill in the tiny model when none is given."""
    if isinstance(args, ServeAppConfig):
        cfg = args
    else:
        try:
            cfg = ServeAppConfig.model_validate(args)
        except ValidationError as e:
            raise ValueError(f"invalid serve app args: {first_error(e)}") from None
    if cfg.model is None:
        preset = "vllm" if cfg.engine_kind == "vllm" else "tiny"
        cfg = cfg.model_copy(update={"model": str(tiny_model(preset)), "served_model_name": cfg.model_name})
    elif not (Path(cfg.model) / "config.json").is_file():
        raise ValueError(f"model: {cfg.model} is not a checkpoint directory (no config.json)")
    for name, path in cfg.lora_modules.items():
        if not is_url(path) and not (Path(path) / FILES[0]).is_file():
            raise ValueError(f"lora_modules.{name}: {path} is not a PEFT adapter directory (no {FILES[0]})")
    if (cfg.engine_kind == "vllm" and (cfg.lora_root or cfg.lora_modules) and cfg.engine_config().device == "cpu"
            and ModelConfig.from_pretrained(cfg.model).moe_layers):
        raise ValueError("lora_root / lora_modules: engine.kind vllm on the CPU cannot serve LoRA adapters on a "
                         "mixture-of-experts model (vLLM then needs its Triton MoE kernel, which its CPU build "
                         "lacks); use engine.kind raymoe, or vLLM on GPU nodes (engine.device cuda)")
    return cfg


# how often a stopping replica checks whether its requests are done (Serve's default 2 s): stopping still waits for
# every running request (up to graceful_shutdown_timeout_s), an idle replica goes at once (Ctrl-C, scale-down)
SHUTDOWN_POLL_S = 0.2

CHECKOUT = Path(__file__).resolve().parents[1]      # the repository root when raymoe is installed from a checkout


def vllm_python(settings: VLLMSettings) -> str | None:
    """The Python that runs vLLM replicas: engine.vllm.python, else $RAYMOE_VLLM_PYTHON, else None (this one) when it
    can import vllm, else the checkout's .cache/vllm-venv (benchmarks/setup_vllm.sh). The path must exist on every
    node that runs a replica; it is checked here, on the node that builds the app."""
    py = settings.python or os.environ.get("RAYMOE_VLLM_PYTHON")
    if py is None:
        if importlib.util.find_spec("vllm") is not None:
            return None
        local = CHECKOUT / ".cache" / "vllm-venv" / "bin" / "python"
        if not local.is_file():
            raise ValueError("engine.kind vllm: no Python with vLLM found (set engine.vllm.python or "
                             "RAYMOE_VLLM_PYTHON, `pip install raymoe[vllm]`, or run benchmarks/setup_vllm.sh)")
        py = str(local)
    if not Path(py).is_file():
        raise ValueError(f"engine.vllm.python: {py} does not exist")
    return py


def vllm_runtime_env(cfg: ServeAppConfig) -> dict:
    """The vLLM replicas' runtime_env: the app's own, plus `py_executable` of vLLM's environment when it is another
    one (Ray starts the replica's worker with that Python; it needs the same ray and raymoe installed)."""
    env = dict(cfg.runtime_env)
    py = vllm_python(cfg.vllm_settings())
    if py is not None:
        env["py_executable"] = py
    env["env_vars"] = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **env.get("env_vars", {})}
    return env


def _placement(engine: EngineConfig) -> dict:
    """With expert shards on Ray, each model replica gets a placement group: its own bundle (the router) first,
    then one per shard; the engine starts its shards in those bundles."""
    par = engine.parallel
    if not par.num_shards or par.transport == "local" or not par.use_placement_group:
        return {}
    from raymoe.platform.parallel.placement import replica_bundles
    return {"placement_group_bundles": replica_bundles(par), "placement_group_strategy": par.placement_strategy}


def build_app(args: dict[str, Any] | ServeAppConfig) -> Application:
    cfg = app_config(args)
    env = {"runtime_env": cfg.runtime_env} if cfg.runtime_env else {}
    auto = cfg.autoscaling.model_dump(exclude_none=True)
    engine = cfg.engine_config()
    metrics = MetricsCollector.bind(stale_after_s=max(5.0, 4 * cfg.metrics_interval_s))
    if cfg.ingress == "fused":                 # the OpenAI routes on the replica that owns the engine
        slots = cfg.max_ongoing_requests + cfg.max_queued_requests + 16
        fused = OpenAIIngress.options(
            name="ModelServer", autoscaling_config=auto,
            # the replica admits max_ongoing + max_queued generation requests itself (then an OpenAI 429); Serve's
            # own bounds sit above that (with room for /health, /metrics...), since Serve's queue also holds requests
            # a proxy has not yet placed on a replica: a bound there alone would refuse a burst a replica can take
            max_ongoing_requests=slots, max_queued_requests=slots, graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
            backpressure_config={"status_code": 429, "retry_after_s": cfg.retry_after_s},
            ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, **env},
            **_placement(engine),
        )
        return fused.bind(cfg, None, metrics)
    vllm = cfg.engine_kind == "vllm"
    server, model_env = (VLLMServer, {"runtime_env": vllm_runtime_env(cfg)}) if vllm else (ModelServer, env)
    model = server.options(
        autoscaling_config=auto, max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests, graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
        backpressure_config={"status_code": 429, "retry_after_s": cfg.retry_after_s},   # if one escapes the ingress
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, **model_env},
        **({} if vllm else _placement(engine)),
    )
    ingress = OpenAIIngress.options(
        num_replicas=cfg.ingress_replicas, graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
        max_ongoing_requests=4 * (cfg.max_ongoing_requests * cfg.autoscaling.max_replicas + cfg.max_queued_requests),
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus, **env},
    )
    preload = [AdapterRef(name=n, path=p) for n, p in cfg.lora_modules.items()]   # on every replica, at its start
    if vllm:
        extra = (cfg.vllm_settings().engine_args, cfg.vllm_settings().env, preload,
                 bool(cfg.lora_root or cfg.lora_modules))
    else:
        extra = (preload, cfg.engine_process)
    return ingress.bind(cfg, model.bind(engine, metrics, cfg.metrics_interval_s, *extra), metrics)
