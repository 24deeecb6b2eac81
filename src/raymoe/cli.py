"""The `raymoe` command line (typer): tiny-checkpoint, and the serve/generate/finetune/bench verbs as they land.

Bad input ends with a one-line message on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@app.command("tiny-checkpoint")
def tiny_checkpoint(
    out_dir: Path = typer.Argument(..., help="directory to write the checkpoint into"),
    seed: int = typer.Option(0, help="random seed of the weights"),
    preset: str = typer.Option("tiny", help="tiny | vllm (kv_lora_rank 512, qk_rope_head_dim 64: runs on vLLM CPU)"),
    fp8: bool = typer.Option(False, "--fp8", help="block-quantise the layer weights to float8_e4m3fn as the release"),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float32 for the non-FP8 tensors"),
    expert_files: int = typer.Option(2, help="routed experts are split into this many safetensors files"),
    hidden_size: Optional[int] = typer.Option(None), layers: Optional[int] = typer.Option(None, "--layers"),
    dense_layers: Optional[int] = typer.Option(None, help="first_k_dense_replace"),
    experts: Optional[int] = typer.Option(None, help="n_routed_experts"),
    experts_per_tok: Optional[int] = typer.Option(None), n_group: Optional[int] = typer.Option(None),
    topk_group: Optional[int] = typer.Option(None), heads: Optional[int] = typer.Option(None),
    vocab_size: Optional[int] = typer.Option(None), mtp_layers: Optional[int] = typer.Option(None),
    set_: list[str] = typer.Option([], "--set", help="any config.json field, KEY=JSON (repeatable)"),
) -> None:
    """Write a small random DeepSeek-V3 checkpoint in the exact Hugging Face layout, with a tokenizer."""
    from raymoe.platform.checkpoint import PRESETS, TinySpec, write_tiny_checkpoint
    from raymoe.platform.config import ConfigError

    if preset not in PRESETS:
        fail(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    overrides = {k: v for k, v in dict(
        hidden_size=hidden_size, num_hidden_layers=layers, first_k_dense_replace=dense_layers,
        n_routed_experts=experts, num_experts_per_tok=experts_per_tok, n_group=n_group, topk_group=topk_group,
        num_attention_heads=heads, vocab_size=vocab_size, num_nextn_predict_layers=mtp_layers).items()
        if v is not None}
    for item in set_:
        key, sep, raw = item.partition("=")
        if not sep:
            fail(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    try:
        spec = TinySpec(preset=preset, seed=seed, fp8=fp8, dtype=dtype, expert_files=expert_files,
                        overrides=overrides)
        out = write_tiny_checkpoint(out_dir, spec)
    except (ConfigError, ValueError) as e:
        fail(str(e).splitlines()[0])
    typer.echo(str(out))


@app.command()
def generate(
    model: Path = typer.Option(..., help="HF DeepSeek-V3 checkpoint directory"),
    prompt: str = typer.Option(..., help="prompt text"),
    max_tokens: int = typer.Option(64), temperature: float = typer.Option(0.0), top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0), seed: Optional[int] = typer.Option(None), mtp: int = typer.Option(
        0, help="MTP speculative tokens per step (0: off)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the tokenizer's chat template"),
    device: str = typer.Option("cpu"), dtype: Optional[str] = typer.Option(None),
    quantization: str = typer.Option("auto", help="FP8 weights of an FP8 checkpoint: auto (FP8 on cuda, dequantised "
                                     "on cpu) | fp8 (FP8 on any device) | none (dequantised)"),
    cpu_compile: bool = typer.Option(False, "--cpu-compile", help="torch.compile the CPU decode step (faster "
                                     "per token after tens of seconds of compilation)"),
    ep: int = typer.Option(0, "--ep", help="expert shards (0: routed experts in this process)"),
    transport: str = typer.Option("ray", help="expert-shard transport: local | ray | collective"),
    plan: Optional[Path] = typer.Option(None, help="placement plan JSON (default: contiguous ranges)"),
    balance: bool = typer.Option(False, "--balance", help="print the expert-load balance per layer to stderr"),
) -> None:
    """Generate a completion: the text alone on stdout, a one-line speed summary on stderr."""
    import time

    from pydantic import ValidationError

    from raymoe.platform.checkpoint import CheckpointError
    from raymoe.platform.config import ConfigError, EngineConfig, ParallelConfig, SamplingParams
    from raymoe.platform.engine import LLMEngine, RequestError

    engine = None
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        parallel = ParallelConfig(num_shards=ep, transport=transport, plan=str(plan) if plan else None,
                                  cpus_per_shard=0.5, router_cpus=0.5)
        if ep and transport != "local":
            _start_ray()
        t0 = time.perf_counter()
        engine = LLMEngine(EngineConfig(model=str(model), device=device, dtype=dtype, num_speculative_tokens=mtp,
                                        max_model_len=None, cpu_compile=cpu_compile, parallel=parallel,
                                        quantization=quantization))
        if engine.tokenizer is None:
            fail(f"{model}: no tokenizer.json, cannot encode a text prompt")
        tok = engine.tokenizer
        ids = (tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] if chat
               else tok(prompt).input_ids)
        t1 = time.perf_counter()
        out = engine.generate([ids], params)[0]["outputs"][0]
        t2 = time.perf_counter()
    except ValidationError as e:
        err = e.errors()[0]
        fail(f"invalid {'.'.join(map(str, err['loc']))}: {str(err['msg']).removeprefix('Value error, ')}")
    except (ConfigError, CheckpointError, RequestError, ValueError, RuntimeError) as e:
        if engine is not None:
            engine.close()
        fail(str(e).splitlines()[0])
    if balance:
        typer.echo(engine.expert_balance().table(), err=True)
    engine.close()
    typer.echo(out["text"])
    n = len(out["token_ids"])
    prop, acc = out.get("spec", (0, 0))
    spec = f", MTP acceptance {acc / prop:.0%} ({acc}/{prop})" if prop else ""
    typer.echo(f"{n} tokens in {t2 - t1:.2f}s ({n / max(t2 - t1, 1e-9):.1f} tokens/s; load {t1 - t0:.1f}s; "
               f"finish {out['finish_reason']}{spec})", err=True)


def _start_ray() -> None:
    """Join the Ray cluster RAY_ADDRESS names (or one running on this machine), else start a local one."""
    import os

    import ray
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")


@app.command()
def serve(
    model: Optional[Path] = typer.Option(None, help="HF DeepSeek-V3 checkpoint directory (default: the built-in "
                                         "tiny model, written once under ~/.cache/raymoe/tiny)"),
    ep: Optional[int] = typer.Option(None, help="expert-parallel shards per replica"),
    engine: Optional[str] = typer.Option(None, help="raymoe | vllm: the engine of the model replicas (vllm: vLLM's "
                                         "AsyncLLM, from its own environment when vLLM is not installed here)"),
    host: str = typer.Option("127.0.0.1", help="address the HTTP proxy binds"),
    port: int = typer.Option(8000, help="HTTP port"),
    api_key_env: Optional[str] = typer.Option(None, help="env var holding the API key clients must send "
                                              "(Authorization: Bearer KEY); unset: no key"),
    config: Optional[Path] = typer.Option(None, "--config", help="Serve config YAML (deployments/configs/) or a "
                                          "YAML of app args; the options above override it"),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: $RAY_ADDRESS, else start a "
                                          "local one)"),
    lora_root: Optional[str] = typer.Option(None, help="folder (or s3:// / gs:// URL) of LoRA adapters, one PEFT "
                                            "directory per adapter name; served as model=<name>"),
    lora_modules: list[str] = typer.Option([], help="NAME=PATH of a LoRA adapter loaded at start (repeatable; "
                                           "several NAME=PATH in one value, space-separated, also work)"),
    max_loras: Optional[int] = typer.Option(None, help="LoRA adapters resident per replica"),
) -> None:
    """Serve the OpenAI-compatible API (Ray Serve) and stay up; prints the base URL."""
    from raymoe.deployments.local import parse_lora_modules, read_config, serve_forever

    try:
        args, prefix = read_config(config) if config else ({}, "/")
        for key, value in (("model", model and str(model)), ("ep", ep), ("api_key_env", api_key_env),
                           ("lora_root", lora_root), ("max_loras", max_loras)):
            if value is not None:
                args[key] = value
        if lora_modules:
            args["lora_modules"] = {**(args.get("lora_modules") or {}), **parse_lora_modules(lora_modules)}
        if engine is not None:
            if engine not in ("raymoe", "vllm"):
                fail(f"--engine: expected raymoe or vllm, got {engine!r}")
            given = args.get("engine")
            args["engine"] = {**(given if isinstance(given, dict) else {}), "kind": engine}
        if api_key_env and not os.environ.get(api_key_env):
            fail(f"--api-key-env {api_key_env}: the variable is not set")
        serve_forever(args, host=host, port=port, address=address, route_prefix=prefix,
                      ready=lambda msg: typer.echo(msg, err=False))
    except ValueError as e:
        fail(str(e).splitlines()[0])


@app.command()
def finetune(
    config: Path = typer.Option(..., "--config", help="job YAML (see finetune/configs/tiny-lora.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="override a job key, KEY=VALUE (repeatable)"),
) -> None:
    """Run a LoRA (or full) finetuning job on Ray Train; the same as `python -m raymoe.finetune`."""
    from raymoe.finetune.__main__ import run_cli
    raise typer.Exit(run_cli(config, set_))


@app.command("plan-memory")
def plan_memory_cmd(
    gpus: int = typer.Option(8, help="GPUs of one replica: GPU 0 the router, the rest expert shards"),
    gpu_gb: float = typer.Option(141.0, help="memory per GPU, decimal GB (H200: 141)"),
    seqs: int = typer.Option(4, help="sequences whose latent KV cache the router holds"),
    context: int = typer.Option(131072, help="tokens per sequence"),
    experts: str = typer.Option("fp8", help="routed-expert weights: fp8 (128x128 block scales, as an FP8 "
                                "checkpoint loads on GPUs) | bf16"),
    reserve_gb: float = typer.Option(8.0, help="per-GPU reserve for activations, CUDA context and graphs"),
    model: Optional[Path] = typer.Option(None, help="config.json folder (default: the published DeepSeek-V3)"),
) -> None:
    """Memory dry run of the expert-parallel layout (no GPU touched): GB per GPU, and whether it fits."""
    from raymoe.platform.config import ConfigError, ModelConfig
    from raymoe.platform.parallel.memory_plan import deepseek_v3_config, plan_memory
    try:
        cfg = ModelConfig.from_pretrained(model) if model else deepseek_v3_config()
        plan = plan_memory(cfg, gpus=gpus, gpu_gb=gpu_gb, expert_format=experts, seqs=seqs, context=context,
                           reserve_gb=reserve_gb)
    except (ConfigError, ValueError) as e:
        fail(str(e).splitlines()[0])
    typer.echo(plan.table())
    raise typer.Exit(0 if plan.fits else 1)


@app.command()
def version() -> None:
    """Print the raymoe version."""
    from raymoe import __version__
    typer.echo(__version__)


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
