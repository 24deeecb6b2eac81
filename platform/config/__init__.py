"""Pydantic configuration models shared by every raymoe component."""
from raymoe.platform.config.engine_config import EngineConfig, GrammarSpec, SamplingParams
from raymoe.platform.config.model_config import ConfigError, ModelConfig, QuantizationConfig, RopeScaling
from raymoe.platform.config.parallel_config import ParallelConfig

__all__ = ["ConfigError", "EngineConfig", "GrammarSpec", "ModelConfig", "ParallelConfig", "QuantizationConfig",
           "RopeScaling", "SamplingParams"]
