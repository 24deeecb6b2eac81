"""The inference engine: continuous batching over a paged latent KV cache, chunked prefill, sampling, MTP
speculative decoding, per-request LoRA adapters, and an asyncio streaming front."""
from raymoe.platform.engine.adapters import AdapterInvalid, AdapterNotFound
from raymoe.platform.engine.async_engine import AsyncEngine
from raymoe.platform.engine.llm_engine import Delta, LLMEngine, RequestError, check_request

__all__ = ["AdapterInvalid", "AdapterNotFound", "AsyncEngine", "Delta", "LLMEngine", "RequestError", "check_request"]
