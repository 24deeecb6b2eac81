"""Pydantic configuration models shared by every raymoe component."""
from raymoe.platform.config.model_config import ModelConfig, RopeScaling, QuantizationConfig, ConfigError

__all__ = ["ModelConfig", "RopeScaling", "QuantizationConfig", "ConfigError"]
