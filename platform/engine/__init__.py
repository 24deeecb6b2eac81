"""The inference engine: continuous batching over a paged latent KV cache, chunked prefill, sampling, MTP
speculative decoding, per-request LoRA adapters, and asyncio streaming fronts (the engine in a thread of the
server, or in a process of its own)."""
from raymoe.platform.engine.adapters import AdapterInvalid, AdapterNotFound
from raymoe.platform.engine.async_engine import AsyncEngine, EngineClient, EngineDead
from raymoe.platform.engine.engine_process import EngineProcess
from raymoe.platform.engine.llm_engine import Delta, LLMEngine, RequestError, check_request

__all__ = ["AdapterInvalid", "AdapterNotFound", "AsyncEngine", "Delta", "EngineClient", "EngineDead", "EngineProcess",
           "LLMEngine", "RequestError", "check_request"]
