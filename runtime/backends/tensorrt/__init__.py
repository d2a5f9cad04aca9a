"""The TensorRT backend, one runner and one loader for both flavours (full TensorRT, TensorRT-RTX)."""
from .flavours import FLAVOURS, FULL, RTX, TensorRTFlavour, describe_targets
from .loader import TensorRTBackend, engine_targets, full_tensorrt, tensorrt_rtx
from .runner import TensorRTRunner, bf16_bits_to_float32, float32_to_bf16_bits

__all__ = ["FLAVOURS", "FULL", "RTX", "TensorRTBackend", "TensorRTFlavour", "TensorRTRunner",
           "bf16_bits_to_float32", "describe_targets", "engine_targets", "float32_to_bf16_bits",
           "full_tensorrt", "tensorrt_rtx"]
