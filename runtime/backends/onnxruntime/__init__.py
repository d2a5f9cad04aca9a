"""The ONNX Runtime backend: CPU everywhere, CUDA with onnxruntime-gpu."""
from .loader import DeviceTimedRunner, OnnxRuntimeBackend
from .runner import (CPU_PROVIDER, CUDA_PROVIDER, OnnxRuntimeRunner, OrtCudaMemory,
                     cuda_available, default_providers, device_array, numpy_dtype,
                     session_options)

__all__ = ["CPU_PROVIDER", "CUDA_PROVIDER", "DeviceTimedRunner", "OnnxRuntimeBackend",
           "OnnxRuntimeRunner", "OrtCudaMemory", "cuda_available", "default_providers",
           "device_array", "numpy_dtype", "session_options"]
