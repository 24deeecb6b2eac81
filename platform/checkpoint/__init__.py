"""Hugging Face checkpoint I/O for DeepSeek-V3: read, FP8 dequantise, map keys, load subsets of experts, write."""
from raymoe.platform.checkpoint.fp8 import dequantize_blockwise, quantize_blockwise
from raymoe.platform.checkpoint.loader import load_model
from raymoe.platform.checkpoint.reader import CheckpointError, SafetensorsReader
from raymoe.platform.checkpoint.tiny import PRESETS, TinySpec, write_tiny_checkpoint
from raymoe.platform.checkpoint.writer import save_checkpoint

__all__ = ["CheckpointError", "PRESETS", "SafetensorsReader", "TinySpec", "dequantize_blockwise", "load_model",
           "quantize_blockwise", "save_checkpoint", "write_tiny_checkpoint"]
