"""ONNX Runtime runner: the CPU provider everywhere, the CUDA provider with onnxruntime-gpu.

CPU: numpy arrays go into `InferenceSession.run` as they are (ONNX Runtime reads contiguous
numpy memory in place, views of cache rows included), so the host-side cache is zero-copy.

CUDA: the `Runner` interface (backends/base.py) with device feeds and outputs. Feeds may be
`DeviceArray`s (bound in place through IOBinding), outputs named in `device_outputs` stay on
the GPU as `DeviceArray`s, the rest come back as numpy. Cache buffers are device allocations
(`OrtCudaMemory`: backends/cuda.py's `CudaMemory` over OrtValues), and a commit is a strided
device-to-device copy (cudaMemcpy2DAsync through ctypes: no extra Python dependency), so a
step moves no cache between host and device. TF32 is
off: it moves fp32 logits enough to change sampled tokens. This path needs onnxruntime-gpu and
a GPU and is chosen only where the CUDA provider is offered; CI cannot run it (its test skips).
"""
from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ...cuda_memory import CudaMemory, DeviceArray
from ...kv import HostMemory
from ..base import Runner

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

_ONNX_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(bool)": np.dtype(np.bool_),
}


def numpy_dtype(onnx_type: str) -> np.dtype:
    """numpy dtype of an ONNX tensor type string (bf16 caches are not supported here)."""
    if onnx_type not in _ONNX_TYPES:
        raise TypeError(f"ONNX type {onnx_type} is not supported by the ONNX Runtime backend")
    return _ONNX_TYPES[onnx_type]


def cuda_available() -> bool:
    """True where onnxruntime-gpu is installed and lists the CUDA provider."""
    return CUDA_PROVIDER in ort.get_available_providers()


def default_providers(device: str = "auto", wanted: Sequence[str] | None = None) -> list[Any]:
    """Providers for `device` (auto, cpu or cuda); `auto` takes CUDA where the bundle allows it
    (`wanted`, from its manifest, or any) and onnxruntime-gpu offers it, else the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown ONNX Runtime device {device!r}; choose auto, cpu or cuda")
    allowed = wanted is None or CUDA_PROVIDER in wanted
    if device == "cpu" or (device == "auto" and not (allowed and cuda_available())):
        return [CPU_PROVIDER]
    if not cuda_available():
        raise RuntimeError("the CUDA provider needs onnxruntime-gpu (pip install "
                           "'dspark-export[gpu]') and a GPU; this onnxruntime offers "
                           f"{ort.get_available_providers()}")
    _preload_cuda_libraries()
    # TF32 matmuls move fp32 logits by ~1e-3: enough to flip sampled tokens against the reference.
    return [(CUDA_PROVIDER, {"use_tf32": "0"}), CPU_PROVIDER]


# Graphs whose intra-op threads may busy-wait between runs. The four sessions take turns on the
# same cores, so spinning threads of an idle session slow the one running; only the target,
# which dominates a step, keeps spinning (spinning off everywhere slows target-only decoding).
SPINNING_GRAPHS = frozenset({"target"})


def session_options(settings: Mapping[str, Any], *, spinning: bool = True) -> ort.SessionOptions:
    """SessionOptions from a manifest's `session_options` (level and thread count)."""
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    level = settings.get("graph_optimization_level")
    if level:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    threads = settings.get("intra_op_num_threads")
    if threads:
        options.intra_op_num_threads = int(threads)
    return options


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels before a CUDA session is created (ORT >= 1.21)."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


class OnnxRuntimeRunner(Runner):
    """One ONNX graph in one InferenceSession."""

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 session_options: ort.SessionOptions | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: graph file missing")
        self.name = path.stem
        self.session = ort.InferenceSession(str(path), sess_options=session_options,
                                            providers=list(providers or default_providers()))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shapes = {i.name: tuple(i.shape) for i in self.session.get_inputs()}
        self.input_dtypes = {i.name: numpy_dtype(i.type) for i in self.session.get_inputs()
                             if i.type in _ONNX_TYPES}
        self.on_device = self.session.get_providers()[0] == CUDA_PROVIDER
        self.memory = OrtCudaMemory() if self.on_device else HostMemory()

    def run(self, feeds: Mapping[str, Any], device_outputs: Collection[str] = ()) -> dict[str, Any]:
        """Run with host or device feeds; `device_outputs` stay where the graph ran."""
        if self.session is None:
            raise RuntimeError(f"{self.name}: the runner is closed")
        if not self.on_device:
            return dict(zip(self.output_names, self.session.run(self.output_names, dict(feeds))))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, DeviceArray):
                binding.bind_input(name, "cuda", 0, value.dtype.type, list(value.shape), value.ptr)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cuda" if name in device_outputs else "cpu", 0)
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        values = binding.get_outputs()
        return {name: device_array(v) if name in device_outputs else v.numpy()
                for name, v in zip(self.output_names, values)}

    def close(self) -> None:
        self.session = None


def device_array(value: ort.OrtValue) -> DeviceArray:
    """A DeviceArray over an OrtValue on the GPU (the OrtValue is its owner)."""
    return DeviceArray(value, value.data_ptr(), tuple(value.shape()), numpy_dtype(value.data_type()))


class OrtCudaMemory(CudaMemory):
    """`CudaMemory` whose buffers ONNX Runtime allocates (OrtValues on its CUDA allocator)."""

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceArray:
        return device_array(ort.OrtValue.ortvalue_from_shape_and_type(
            list(shape), np.dtype(dtype).type, "cuda", 0))
